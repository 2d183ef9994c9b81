"""Vision-tower throughput: our JAX Qwen2.5-VL tower against transformers (torch, sdpa) on the same weights.

    python -m m2io_jax.bench.vision [--images=16] [--image_size=448] [--iters=3]

A mid-size tower (depth 8, width 256, 4 heads, MLP 684, window 112 with full attention in blocks 3 and 7:
the 3B tower's 1-in-4-to-8 window/full mix, scaled) on `--images` random images of `--image_size` x
`--image_size` pixels, float32, both sides on the same CPU threads. Both timings start from `pixel_values` and
`image_grid_thw` as the image processor returns them: ours includes the host-side layout planning
(`plan_vision_inputs`) and excludes compilation (one warm-up call). The two sides alternate, medians of
`--iters` runs are compared. The last line is one JSON object.

The JSON also places both timings against the machine's arithmetic: `gflop` counts the tower's matmul
FLOPs (projections, MLPs, merger and attention), `gemm_gflops` is the best float32 rate of a plain
`[patches, width] x [width, mlp]` matmul in either framework on the same threads, and `speedup_ceiling`
is what the ratio would be if our tower ran every FLOP at that rate with nothing else costing time. On a
CPU this ceiling, not the code, bounds the ratio.

With a GPU visible to both frameworks (jax's default backend "gpu" and torch.cuda), both sides run there.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
import torch
from absl import flags
from flax import nnx

from m2io_jax import cli
from m2io_jax.models import hf
from m2io_jax.models.qwen2_5_vl import VisionTower
from m2io_jax.models.qwen2_5_vl_config import VisionConfig
from m2io_jax.models.qwen2_5_vl_hf import vision_tensor_specs
from m2io_jax.models.qwen2_5_vl_inputs import plan_vision_inputs

HF_VISION = dict(depth=8, hidden_size=256, intermediate_size=684, num_heads=4, in_channels=3, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=512,
                 fullatt_block_indexes=[3, 7], tokens_per_second=2)

# `--image_size`, not `--size`: absl flags are global, and the sampler benchmark's `--size` names a model.
_IMAGES = flags.DEFINE_integer("images", 16, "images in the batch")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 448, "image side in pixels (a multiple of the patch size)")
_ITERS = flags.DEFINE_integer("iters", 3, "timed runs per side (medians are compared)")


def _torch_tower(seed: int):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    config = Qwen2_5_VLVisionConfig(**HF_VISION)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _jax_tower(torch_model) -> VisionTower:
    """Our tower holding the torch model's weights, read through the checkpoint mapping used for real weights."""
    from safetensors.torch import save_file

    config = VisionConfig.from_hf(HF_VISION)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in torch_model.state_dict().items()}
        save_file(tensors, os.path.join(tmp, hf.SINGLE_FILE))
        return hf.load_model(tmp, lambda: VisionTower(config, rngs=nnx.Rngs(0)),
                             vision_tensor_specs(config, prefix="", path_prefix=()), dtype=jax.numpy.float32, mesh=None)


def tower_gflop(config: VisionConfig, grid: np.ndarray) -> tuple[float, float]:
    """Matmul GFLOP of one tower pass over images of these (t, h, w) grids (2 FLOPs per multiply-add).

    Returns (linear, attention): patch embedding, projections, MLPs and merger; then QK^T and PV of the window
    blocks (keys of each window, edge windows smaller) and the full-attention blocks (all patches of a frame).
    """
    d, f = config.hidden_size, config.intermediate_size
    patches = int(grid.prod(axis=1).sum())
    linear = patches * (config.patch_dim * d + config.depth * (4 * d * d + 3 * d * f))
    merged = patches // config.merge_unit
    wide = d * config.merge_unit
    merger = merged * (wide * wide + wide * config.out_hidden_size)
    full = len(config.fullatt_block_indexes)
    side = config.window_units * config.spatial_merge_size  # window side in patches
    window_keys = frame_keys = 0
    for t, h, w in grid.tolist():
        rows = [min(side, h - r) for r in range(0, h, side)]
        cols = [min(side, w - c) for c in range(0, w, side)]
        window_keys += t * sum((r * c) ** 2 for r in rows for c in cols)
        frame_keys += t * (h * w) ** 2
    attention = 2 * d * ((config.depth - full) * window_keys + full * frame_keys)  # QK^T and PV
    return 2 * (linear + merger) / 1e9, 2 * attention / 1e9


def gemm_gflops(rows: int, config: VisionConfig, device: str, iters: int = 5) -> float:
    """Best float32 GFLOP/s of `[rows, width] x [width, mlp]` in jax or torch (the tower's typical matmul)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, config.hidden_size)).astype(np.float32)
    b = rng.standard_normal((config.hidden_size, config.intermediate_size)).astype(np.float32)
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    matmul = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for run in (lambda: jax.block_until_ready(matmul(ja, jb)), lambda: _sync(device, ta @ tb)):
        run()
        best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(_seconds(run) for _ in range(iters)) / 1e9)
    return best


def _sync(device: str, out):
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    images, image_size, iters = _IMAGES.value, _IMAGE_SIZE.value, _ITERS.value

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch_model = _torch_tower(seed=0).to(device)
    tower = _jax_tower(torch_model)
    config = tower.config

    side = image_size // config.patch_size
    grid = np.tile(np.array([[1, side, side]], np.int64), (images, 1))
    patches = int(grid.prod(1).sum())
    pixels = np.random.default_rng(0).standard_normal((patches, config.patch_dim)).astype(np.float32)
    pixels_t, grid_t = torch.from_numpy(pixels).to(device), torch.from_numpy(grid).to(device)

    encode = jax.jit(lambda model, x: model(x))

    def ours():
        return jax.block_until_ready(encode(tower, plan_vision_inputs(pixels, grid, config)))

    def theirs():
        with torch.no_grad():
            return _sync(device, torch_model(pixels_t, grid_thw=grid_t).pooler_output)

    start = time.perf_counter()
    got = np.asarray(ours())
    compile_s = time.perf_counter() - start
    want = theirs().cpu().numpy()
    max_abs_diff = float(np.abs(got[:len(want)] - want).max())
    plan_s = statistics.median(_seconds(lambda: plan_vision_inputs(pixels, grid, config)) for _ in range(iters))
    # Interleaved, so that load from other processes on a shared machine hits both sides alike.
    pairs = [(_seconds(ours), _seconds(theirs)) for _ in range(iters)]
    ours_s = statistics.median(p[0] for p in pairs)
    theirs_s = statistics.median(p[1] for p in pairs)
    gflop = sum(tower_gflop(config, grid))
    gemm = gemm_gflops(patches, config, device)
    result = {
        "benchmark": "vision_tower", "images": images, "image_size": image_size, "patches": patches,
        "dtype": "float32", "threads": threads, "backend": jax.default_backend(), "torch_device": device,
        "jax_images_per_s": round(images / ours_s, 2), "torch_images_per_s": round(images / theirs_s, 2),
        "speedup": round(theirs_s / ours_s, 2), "gflop": round(gflop, 1),
        "jax_gflops": round(gflop / ours_s, 1), "torch_gflops": round(gflop / theirs_s, 1),
        "gemm_gflops": round(gemm, 1), "speedup_ceiling": round(theirs_s * gemm / gflop, 2),
        "jax_host_plan_ms": round(1e3 * plan_s, 2), "jax_compile_s": round(compile_s, 1), "max_abs_diff": max_abs_diff,
    }
    print(f"ours {ours_s * 1e3:.1f} ms, transformers {theirs_s * 1e3:.1f} ms for {images} images; "
          f"{gflop:.0f} GFLOP: {gflop / ours_s:.1f} vs {gflop / theirs_s:.1f} GFLOP/s, "
          f"plain matmul {gemm:.1f} GFLOP/s, speedup ceiling at that rate {theirs_s * gemm / gflop:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
