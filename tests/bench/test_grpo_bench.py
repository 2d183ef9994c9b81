"""The GRPO benchmark: its shared reward, tunix's micro-batch sizing, the one-process-per-side runner, and a smoke
run of both sides."""

import math
import os

import pytest

from m2io_jax.bench import grpo as bench
from m2io_jax.bench.sampler import SIZES, Workload
from tests.bench.smoke import assert_positive_finite, run_benchmark


def test_reward_is_the_fraction_of_ids_in_the_fixed_set():
    assert bench.reward_of([0, 1, 2, 3, 4, 8]) == pytest.approx(0.5)
    assert bench.reward_of([1, 5, 9]) == 0.0
    assert bench.reward_of([]) == 0.0


def test_micro_batches_keep_tunix_logits_under_the_bound():
    long = Workload(prompt=1024, new=128, samples=8)
    assert bench.micro_batch_prompts(SIZES["40m"], long, logits_gib=1.5) == 1  # 1.1 GiB per prompt
    assert bench.micro_batch_prompts(SIZES["40m"], Workload(128, 128, 8), logits_gib=1.5) == 4
    assert bench.micro_batch_prompts(SIZES["tiny"], long, logits_gib=1.5) == 8


def test_run_isolated_runs_in_another_process_and_returns_its_result():
    assert bench.run_isolated("pid probe", os.getpid) != os.getpid()
    assert 0.0 < bench.run_isolated("peak probe", bench.peak_rss_gib) < bench.peak_rss_gib() + 1.0


def test_run_isolated_names_the_side_whose_process_failed():
    with pytest.raises(RuntimeError, match=r"tunix side of 8\+8: its process exited with code 3"):
        bench.run_isolated("tunix side of 8+8", os._exit, 3)


@pytest.mark.slow
def test_grpo_benchmark_smoke_run():
    result = run_benchmark("grpo", "--size=tiny", "--workloads=32x16", "--steps=1", "--warmup_steps=2")
    figures = result["32x16"]
    assert_positive_finite(result, ["ratio_32x16"])
    assert_positive_finite(figures["steps_per_s"], ["m2io_jax", "tunix"])
    assert figures["steps"] == {"m2io_jax": 3, "tunix": 3}, figures["steps"]
    for side, (low, high) in figures["reward_range"].items():
        assert 0.0 <= low <= high <= 1.0, (side, low, high)
    assert figures["m2io_jax_compiles_in_timed_steps"] == 0
    assert_positive_finite(figures["peak_rss_gib"], ["m2io_jax", "tunix"])
    split = figures["time_split_s"]["m2io_jax"]
    assert set(split) == set(bench.SPLIT) and all(math.isfinite(v) and v >= 0 for v in split.values()), split
    assert sum(split.values()) <= 1.05 / figures["steps_per_s"]["m2io_jax"] + 1e-3, split  # parts of one step


@pytest.mark.slow
def test_grpo_benchmark_runs_one_side_alone():
    result = run_benchmark("grpo", "--size=tiny", "--workloads=32x16", "--steps=1", "--warmup_steps=1",
                           "--sides=tunix")
    figures = result["32x16"]
    assert "ratio_32x16" not in result and set(figures["steps_per_s"]) == {"tunix"}, result
    assert "m2io_jax_compiles_in_timed_steps" not in figures
    assert_positive_finite(figures["peak_rss_gib"], ["tunix"])
