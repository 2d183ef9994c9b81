"""The GRPO trainer with LoRA adapters: only the adapters train (the base stays bit-identical and has no optimizer
state), the reference policy is the base model (adapters off, no second copy), a GRPO step holds one copy of the
base weights, and (slow) GRPO with adapters raises the reward from a short SFT start."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import sampling
from m2io_jax.models import lora
from m2io_jax.rl import steps
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from m2io_jax.sampling import sampler as sampler_module
from tests.rl.trainer_helpers import PROMPTS, STOP, fraction_reward, target_fraction, tiny_text_model, trainer_config

BATCH = PromptBatch(PROMPTS, None, [None] * len(PROMPTS))


def flat_params(model) -> dict[str, np.ndarray]:
    """"/"-joined parameter path -> host copy of its value."""
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def base_part(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in params.items() if not lora.is_adapter_path(k)}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def lora_trainer(model=None, *, rank: int = 4, **config):
    model = lora.apply(tiny_text_model() if model is None else model, rank=rank, alpha=2.0 * rank)
    return Trainer(model, trainer_config(**config), reward_fn=fraction_reward(), stop_tokens=[STOP])


def test_grpo_step_updates_only_the_adapters_and_keeps_no_base_optimizer_state():
    base_before = flat_params(tiny_text_model())
    trainer = lora_trainer(beta=0.05)
    trainer.grpo_step(BATCH, step=0)
    metrics = trainer.grpo_step(BATCH, step=1)
    after = flat_params(trainer.model)
    assert base_part(after).keys() == base_before.keys()
    for path, value in base_before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    b_factors = [v for k, v in after.items() if lora.is_adapter_path(k) and k.endswith("_b")]
    assert b_factors and all(np.abs(b).max() > 0 for b in b_factors)  # B started at zero and moved
    assert metrics["kl"] > 0
    adapter_bytes = sum(v.nbytes for k, v in after.items() if lora.is_adapter_path(k))
    moments = nbytes(trainer._opt_state)
    assert 2 * adapter_bytes <= moments < 2 * adapter_bytes + 1024  # Adam's two moments of the adapters, no more
    state = trainer.state()  # what a checkpoint holds: the adapters and their optimizer state, no base weights
    assert set(state) == {"params", "opt_state"}
    saved = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state["params"])}
    assert saved == {k for k in after if lora.is_adapter_path(k)}
    trainer.restore(state)  # the adapters rejoin the frozen base
    np.testing.assert_array_equal(flat_params(trainer.model)[next(iter(base_before))], next(iter(base_before.values())))


def test_reference_is_the_base_model_with_adapters_off():
    trainer = lora_trainer(beta=0.05)
    for step in range(2):
        trainer.grpo_step(BATCH, step=step)
    inputs = trainer.model.prepare_prompts(PROMPTS, None, rows=4, length=8)
    completions = jnp.asarray(np.random.default_rng(0).integers(3, 64, (4, 3, 5)), jnp.int32)
    reference = steps.reference_logprobs(trainer._spec, trainer._params, inputs, None, completions)
    base = tiny_text_model().completion_logprobs(inputs, completions)
    adapted = steps.logprobs(trainer._spec, trainer._params, inputs, None, completions)
    np.testing.assert_allclose(np.asarray(reference), np.asarray(base), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-4


def test_a_grpo_step_holds_one_copy_of_the_base_weights(monkeypatch):
    """Measured on one device in the rollout, right after the sampler has laid out its parameters
    (`sampling_params`), and in the reward function (after the rollout, before the update): the live arrays are
    the base weights once plus small things (adapters, their Adam moments, the rollout). A full-parameter trainer
    with beta > 0 holds the weights, their reference copy and two Adam moments: four."""
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    live_during_step: list[int] = []
    live_in_sampler: list[int] = []
    laid_out = sampler_module.sampling_params

    def measuring_layout(model):
        out = laid_out(model)
        gc.collect()
        live_in_sampler.append(sum(x.nbytes for x in jax.live_arrays()))
        return out

    monkeypatch.setattr(sampler_module, "sampling_params", measuring_layout)

    def measuring_reward(examples, completions):
        gc.collect()
        live_during_step.append(sum(x.nbytes for x in jax.live_arrays()))
        return RewardResult(target_fraction(completions), {}, {})

    def live_in_step(build_model) -> int:
        gc.collect()
        before = sum(x.nbytes for x in jax.live_arrays())
        trainer = Trainer(build_model(), trainer_config(beta=0.05), reward_fn=measuring_reward, stop_tokens=[STOP])
        trainer.grpo_step(BATCH, step=0)
        return max(live_during_step[-1], live_in_sampler[-1]) - before

    gc.collect()
    base_bytes = nbytes(nnx.state(tiny_text_model(**shape), nnx.Param))
    with_lora = live_in_step(lambda: lora.apply(tiny_text_model(**shape), rank=4, alpha=8.0))
    assert base_bytes <= with_lora < 1.25 * base_bytes
    full = live_in_step(lambda: tiny_text_model(**shape))
    assert full > 3.5 * base_bytes


@pytest.mark.slow
def test_grpo_with_adapters_raises_the_reward_from_an_sft_start_and_keeps_the_base():
    """A tiny "SFT checkpoint" (a random Qwen2 after 10 full-parameter SFT steps on fixed targets), then 24 GRPO
    steps that train rank-8 adapters only on R = the fraction of good tokens: R rises by more than 0.3
    (sampling 64 completions before and after), and the base weights come out bit-identical.

    The random weights use std 0.2: adapters leave the LM head and the final norm frozen, and at the default
    std 0.02 the logits span about +-0.1, so no change of the hidden state can move much probability (measured:
    R 0.22 -> 0.24 at std 0.02; 0.19 -> 0.81 at std 0.2 after 16 steps)."""
    sft = Trainer(tiny_text_model(initializer_range=0.2), trainer_config(learning_rate=3e-3), reward_fn=None,
                  stop_tokens=[STOP])
    targets = [[30, 40, 50, STOP], [5, 6, STOP], [60, 61, 62, STOP], [3, 4, 5, 6, STOP]]
    for _ in range(10):
        sft.sft_step(PromptBatch(PROMPTS, None, [None] * len(PROMPTS), targets=targets))
    base_before = flat_params(sft.model)

    def mean_reward(model) -> float:
        out = sampling.generate(model, PROMPTS, max_new_tokens=8, num_samples=16, temperature=1.0, seed=12345,
                                stop_tokens=[STOP])
        return float(target_fraction(out.tokens).mean())

    trainer = lora_trainer(sft.model, rank=8, learning_rate=3e-2, beta=0.01)
    before = mean_reward(trainer.model)
    for step in range(24):
        trainer.grpo_step(BATCH, step=step)
    after = mean_reward(trainer.model)
    assert after - before > 0.3, (before, after)
    params = flat_params(trainer.model)
    for path, value in base_before.items():
        np.testing.assert_array_equal(params[path], value, err_msg=path)


def test_lora_grpo_on_a_mesh_matches_one_device():
    """Adapters shard by their logical axes; two GRPO steps on a (data, fsdp, tensor) mesh give the adapters of
    one device (to float tolerance) and leave the base bit-identical."""
    from m2io_jax import sharding

    def train(mesh):
        model = lora.apply(tiny_text_model(), rank=4, alpha=8.0)
        trainer = Trainer(model, trainer_config(beta=0.05), reward_fn=fraction_reward(), stop_tokens=[STOP],
                          mesh=mesh)
        for step in range(2):
            trainer.grpo_step(BATCH, step=step)
        return flat_params(trainer.model)

    on_mesh = train(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    single = train(None)
    base = flat_params(tiny_text_model())
    for path, value in on_mesh.items():
        if lora.is_adapter_path(path):
            np.testing.assert_allclose(value, single[path], atol=2e-4, err_msg=path)
        else:
            np.testing.assert_array_equal(value, base[path], err_msg=path)
    assert any(np.abs(v).max() > 0 for k, v in on_mesh.items() if k.endswith("_b"))
