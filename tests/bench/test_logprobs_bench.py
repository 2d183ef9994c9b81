"""The log-prob layout / weight-refresh benchmark: its case parsing and prompts, and a smoke run whose two layouts
agree and whose figures are finite."""

import math

import numpy as np
import pytest

from m2io_jax import cli
from m2io_jax.bench import logprobs as bench
from tests.bench.smoke import assert_positive_finite, run_benchmark


def test_cases_parse_and_malformed_ones_are_refused():
    case = bench.parse_case("vl_wide@576x32x2x8", "cases")
    assert (case.model, case.prompt, case.new, case.prompts, case.samples) == ("vl_wide", 576, 32, 2, 8)
    assert case.full_tokens == 2 * 8 * (576 + 32) and str(case) == "vl_wide@576x32x2x8"
    for bad in ("vl_huge@576x32x2x8", "vl_tiny@576x32x2", "vl_tiny@576x0x2x8", "text_40m576x32x2x8"):
        with pytest.raises(cli.UserError, match=r"--cases: .* is not MODEL@PxNxBxG"):
            bench.parse_case(bad, "cases")
    with pytest.raises(cli.UserError, match=r"--refresh_cases: .*prompt length 72 leaves no text"):
        bench.parse_case("vl_tiny@72x8x1x2", "refresh_cases")  # four images take 72 tokens


def test_analytic_flops_count_the_prompt_once_in_the_shared_layout():
    case = bench.parse_case("text_40m@1024x128x8x8", "cases")
    d, layers, v = 512, 8, 32000
    per_token = 2 * (2 * d * d + 2 * d * 128 + 3 * d * 1536)  # q and o, k and v (2 KV heads of 64), the MLP
    head = 2 * d * v * 64 * 128
    full = 3 * (layers * (64 * 1152 * per_token + 4 * d * 64 * 1152**2) + head) / 1e9
    shared = 3 * (layers * ((8 * 1024 + 64 * 128) * per_token + 4 * d * (8 * 1024**2 + 64 * 128 * 1152)) + head) / 1e9
    assert bench.analytic_gflop(case, shared=False) == pytest.approx(full, rel=1e-12)
    assert bench.analytic_gflop(case, shared=True) == pytest.approx(shared, rel=1e-12)


def test_vl_prompts_hold_their_images_and_left_padding():
    model = bench.build_model("vl_tiny")
    case = bench.parse_case("vl_tiny@100x4x3x2", "cases")
    prompts, images = bench.random_prompts(model, case, seed=0)
    assert [len(p) for p in prompts] == [100, 97, 94]
    c = model.config
    for prompt, image in zip(prompts, images):
        assert prompt.count(c.image_token_id) == bench.IMAGES_PER_PROMPT * 16
        assert prompt.count(c.vision_start_token_id) == bench.IMAGES_PER_PROMPT
        assert image["pixel_values"].shape == (bench.IMAGES_PER_PROMPT * 64, c.vision.patch_dim)
        assert min(prompt[bench.IMAGES_PER_PROMPT * 18:]) >= bench.FIRST_TEXT_ID
    inputs = model.prepare_prompts(prompts, images, rows=3, length=100)
    assert inputs.mask.sum(axis=1).tolist() == [100, 97, 94]
    assert np.unique(inputs.image_index[inputs.image_index >= 0]).size == 3 * bench.IMAGES_PER_PROMPT * 16


@pytest.mark.slow
def test_logprobs_benchmark_smoke_run():
    timed = ["vl_tiny@96x8x2x4", "text_40m@32x4x1x2"]
    untimed = "vl_tiny@128x8x2x8"  # 2 * 8 * 136 full-layout tokens: over --max_timed_tokens, FLOPs only
    result = run_benchmark("logprobs", f"--cases={','.join([*timed, untimed])}", "--max_timed_tokens=1000",
                           "--refresh_cases=vl_tiny@96x8x8x2", "--repeats=1", "--fake_devices=8")
    flops = ["shared_gflop", "full_gflop", "flop_ratio", "analytic_shared_gflop", "analytic_full_gflop",
             "analytic_flop_ratio", "params_m"]
    for name in timed:
        figures = result["logprobs"][name]
        assert figures["timed"] and 0 <= figures["max_abs_diff"] < 1e-4, figures  # the layouts agree
        assert_positive_finite(figures, [*flops, "shared_s", "full_s", "speedup"])
        assert figures["flop_ratio"] < 1 and figures["analytic_flop_ratio"] < 1, figures  # the prompt runs once
    assert not result["logprobs"][untimed]["timed"]
    assert_positive_finite(result["logprobs"][untimed], flops)
    refresh = result["refresh"]["vl_tiny@96x8x8x2"]
    assert refresh["devices"] == 8
    assert_positive_finite(refresh, ["param_bytes", "bytes_moved", "refresh_s", "step_s", "fraction_of_step",
                                     "one_device_refresh_s"])
    assert refresh["bytes_moved"] <= 7 * refresh["param_bytes"], refresh  # at most an all-gather over 8 shards
    assert refresh["fraction_of_step"] < 1 and math.isclose(
        refresh["fraction_of_step"], refresh["refresh_s"] / refresh["step_s"], rel_tol=1e-2, abs_tol=1e-5)
