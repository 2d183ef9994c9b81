"""LoRA adapters on the stacked Qwen2 decoder: fresh adapters change nothing, trained ones change the forward,
merge reproduces the adapted forward, disabling gives the base model back, and the factors shard by their axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import sharding
from m2io_jax.models import lora, tiny

VOCAB = 64
SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
IDS = jnp.array([[5, 9, 13, 2, 7, 21], [0, 0, 3, 4, 40, 41]])
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def text_model(seed: int = 0):
    return tiny.init_model(tiny.hf_config("qwen2", VOCAB, text_shape=SHAPE), seed=seed)


def randomise_b(model, seed: int = 1):
    """Gives every B factor random values (as training would), so the adapters change the forward."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and str(path[-1]).endswith("_b"):
            variable.set_value(0.05 * jax.random.normal(next(keys), variable[...].shape, variable[...].dtype))
    return model


def adapter_paths(model) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if lora.is_adapter_path("/".join(map(str, p)))]


def test_fresh_adapters_give_exactly_the_base_logits():
    base = text_model()(IDS, MASK)
    adapted = lora.apply(text_model(), rank=4, alpha=8.0)
    np.testing.assert_array_equal(np.asarray(adapted(IDS, MASK)), np.asarray(base))


def test_target_regex_selects_projections_and_shapes_follow_the_weights():
    model = lora.apply(text_model(), rank=3, alpha=6.0, target=r"(q|v)_proj$")
    assert sorted(adapter_paths(model)) == ["layers/lora/q_proj_a", "layers/lora/q_proj_b",
                                            "layers/lora/v_proj_a", "layers/lora/v_proj_b"]
    everything = lora.apply(text_model(), rank=3, alpha=6.0)
    adapters = everything.layers.lora
    assert adapters.q_proj_a[...].shape == (2, 32, 3) and adapters.q_proj_b[...].shape == (2, 3, 4, 8)
    assert adapters.o_proj_a[...].shape == (2, 4, 8, 3) and adapters.o_proj_b[...].shape == (2, 3, 32)
    assert adapters.down_proj_a[...].shape == (2, 64, 3) and adapters.down_proj_b[...].shape == (2, 3, 32)
    with pytest.raises(ValueError, match="matches none of the projections"):
        lora.apply(text_model(), rank=3, alpha=6.0, target="qkv")
    with pytest.raises(ValueError, match="already has adapters"):
        lora.apply(everything, rank=3, alpha=6.0)


def test_trained_adapters_change_the_forward_and_disabling_restores_the_base():
    base = np.asarray(text_model()(IDS, MASK))
    model = randomise_b(lora.apply(text_model(), rank=4, alpha=8.0))
    adapted = np.asarray(model(IDS, MASK))
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(lora.set_enabled(model, False)(IDS, MASK)), base)
    np.testing.assert_array_equal(np.asarray(lora.set_enabled(model, True)(IDS, MASK)), adapted)


def test_merge_equals_the_adapted_forward_and_leaves_the_model_unchanged():
    model = randomise_b(lora.apply(text_model(), rank=4, alpha=8.0))
    adapted = np.asarray(model(IDS, MASK))
    merged = lora.merge(model)
    assert not lora.has_adapters(merged) and lora.has_adapters(model)
    assert adapter_paths(merged) == []
    np.testing.assert_allclose(np.asarray(merged(IDS, MASK)), adapted, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(model(IDS, MASK)), adapted)
    base = text_model()
    assert np.abs(np.asarray(merged.layers.o_proj[...]) - np.asarray(base.layers.o_proj[...])).max() > 0


def test_adapters_reach_the_sampler_and_log_prob_paths():
    """decode_step and completion_logprobs use the adapters too: sampling the adapted model scores the same as
    the trainer's log-probs of those samples, and differs from the base model's."""
    from m2io_jax import sampling

    model = randomise_b(lora.apply(text_model(), rank=4, alpha=8.0))
    out = sampling.generate(model, [[5, 9, 13], [3, 4]], max_new_tokens=6, num_samples=2, temperature=1.0, seed=3)
    inputs = model.prepare_prompts([[5, 9, 13], [3, 4]], None, rows=2, length=3)
    tokens = np.zeros((2, 2, 6), np.int32)
    for i, completion in enumerate(out.tokens):
        tokens[i // 2, i % 2, :len(completion)] = completion
    adapted = np.asarray(model.completion_logprobs(inputs, jnp.asarray(tokens)))
    sampled = np.zeros_like(adapted)
    for i, logps in enumerate(out.logprobs):
        sampled[i // 2, i % 2, :len(logps)] = logps
    lengths = [len(c) for c in out.tokens]
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(adapted[i // 2, i % 2, :n], sampled[i // 2, i % 2, :n], atol=1e-4)
    base = np.asarray(lora.set_enabled(model, False).completion_logprobs(inputs, jnp.asarray(tokens)))
    assert np.abs(base - adapted).max() > 1e-3


def test_factors_shard_by_their_logical_axes():
    model = lora.apply(text_model(), rank=4, alpha=8.0)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh)
    a = shardings["layers"]["lora"]["q_proj_a"].get_value()
    b = shardings["layers"]["lora"]["q_proj_b"].get_value()
    weight = shardings["layers"]["q_proj"].get_value()
    assert a.spec[:2] == weight.spec[:2] and a.spec[2] is None
    assert b.spec[1] is None and tuple(b.spec[2:]) == tuple(weight.spec[2:])


def test_the_vision_language_model_gets_adapters_in_its_language_model_only():
    model = tiny.init_model(tiny.hf_config("qwen2_5_vl", VOCAB, text_shape={**SHAPE, "num_attention_heads": 2}))
    lora.apply(model, rank=2, alpha=4.0, target=r"language_model/layers/(q|o)_proj$")
    prefix = "language_model/layers/lora/"
    assert sorted(adapter_paths(model)) == [prefix + n for n in ("o_proj_a", "o_proj_b", "q_proj_a", "q_proj_b")]
