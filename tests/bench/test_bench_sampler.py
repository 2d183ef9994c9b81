"""The sampler benchmark: its engines agree on the checkpoint it writes, and a smoke run gives finite figures."""

import numpy as np
import pytest
import torch

from m2io_jax import models, sampling
from m2io_jax.bench import sampler as bench
from tests.bench.smoke import assert_positive_finite, run_benchmark


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(directory, torch model, our model) of the benchmark's tiny random Qwen2."""
    directory = str(tmp_path_factory.mktemp("bench_sampler"))
    torch_model = bench.write_checkpoint(bench.SIZES["tiny"], directory, max_length=128)
    return directory, torch_model, models.from_pretrained(directory)


@pytest.mark.slow
def test_greedy_tokens_match_transformers_on_the_benchmark_checkpoint(tiny_checkpoint):
    _, torch_model, model = tiny_checkpoint
    w = bench.Workload(prompt=16, new=8, samples=1)
    prompts = bench.random_prompts(bench.SIZES["tiny"]["vocab_size"], w)
    ours = sampling.generate(model, prompts, max_new_tokens=w.new, temperature=0.0).tokens
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        theirs = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=w.new,
                                      min_new_tokens=w.new, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[:, w.prompt:].tolist()


@pytest.mark.slow
def test_shared_and_repeated_prefill_draw_the_same_samples(tiny_checkpoint):
    """The two m2io_jax engines the benchmark compares (`--repeated`) sample the same tokens."""
    _, _, model = tiny_checkpoint
    w = bench.Workload(prompt=16, new=8, samples=4)
    prompts = bench.random_prompts(bench.SIZES["tiny"]["vocab_size"], w)
    kwargs = dict(max_new_tokens=w.new, num_samples=w.samples, temperature=1.0, seed=2)
    shared = sampling.generate(model, prompts, **kwargs)
    repeated = sampling.generate_repeated(model, prompts, **kwargs)
    assert shared.tokens == repeated.tokens and len(shared.tokens) == bench.NUM_PROMPTS * w.samples
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)


@pytest.mark.slow
def test_sampler_benchmark_smoke_run():
    result = run_benchmark("sampler", "--size=tiny", "--workloads=32x16", "--samples=4", "--repeated")
    assert result["main_workload"] == "32+16"
    engines = {"m2io_jax", "m2io_jax_repeated_prefill", "transformers", "tunix"}
    assert set(result["tokens_per_s"]) == engines
    assert_positive_finite(result["tokens_per_s"], engines)
    assert_positive_finite(result["ratios"], [f"vs_{e}" for e in engines - {"m2io_jax"}])
    assert_positive_finite(result, ["flop_ceiling"])
    assert result["flop_ceiling"] > 1 and result["compiles"], result
