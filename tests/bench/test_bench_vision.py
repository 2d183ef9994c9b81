"""The vision benchmark: its FLOP count, and a smoke run whose towers agree and whose figures are finite."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m2io_jax.bench import vision as bench
from m2io_jax.models.qwen2_5_vl_config import VisionConfig
from tests.bench.smoke import assert_positive_finite, run_benchmark


def test_flop_count_matches_torch_counter_and_hand_count():
    config = VisionConfig.from_hf(bench.HF_VISION)
    grid = np.array([[1, 20, 14], [2, 6, 8]])  # edge windows of 4 and 6 patches a side; a 2-frame grid
    pixels = torch.zeros(int(grid.prod(1).sum()), config.patch_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # counts convolution and addmm, not sdpa
        bench._torch_tower(seed=0)(pixels, grid_thw=torch.from_numpy(grid))
    linear, attention = bench.tower_gflop(config, grid)
    assert linear == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    windows_20x14 = (8 * 8) ** 2 * 2 + (8 * 6) ** 2 * 2 + (4 * 8) ** 2 + (4 * 6) ** 2  # 8-patch windows, edges
    windows_6x8 = 2 * (6 * 8) ** 2  # one window per frame
    full = (20 * 14) ** 2 + 2 * (6 * 8) ** 2
    d = config.hidden_size
    assert attention == pytest.approx(4 * d * (6 * (windows_20x14 + windows_6x8) + 2 * full) / 1e9, rel=1e-9)


@pytest.mark.slow
def test_vision_benchmark_smoke_run():
    result = run_benchmark("vision", "--images=2", "--image_size=224", "--iters=1")
    assert (result["images"], result["image_size"], result["patches"]) == (2, 224, 2 * 16 * 16)
    assert 0 <= result["max_abs_diff"] < 1e-4  # both towers give the same features
    assert_positive_finite(result, ["jax_images_per_s", "torch_images_per_s", "speedup", "gflop", "jax_gflops",
                                    "torch_gflops", "gemm_gflops", "speedup_ceiling", "jax_host_plan_ms",
                                    "jax_compile_s"])
