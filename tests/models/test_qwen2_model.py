"""Model-level properties of the Qwen2 port: KV cache, chunked log-probs, remat, abstract init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import models
from m2io_jax.models import hf
from m2io_jax.models.presets import qwen2_preset
from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, default_positions
from tests.conftest import TINY_QWEN2, left_padded_batch


@pytest.fixture(scope="module")
def model(tiny_qwen2):
    return models.from_pretrained(tiny_qwen2["tied_gqa"][0])


def test_cached_prefill_then_decode_equals_full_forward(model):
    ids, mask, _ = left_padded_batch(512, (9, 5), seed=1)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model(ids, mask)  # [B, T, V]
    positions = default_positions(mask)
    cache = model.init_cache(batch_size=2, max_length=16)
    prompt = 6
    hidden, cache = model.forward(model.embed(ids[:, :prompt]), positions=positions[:, :prompt],
                                  segment_ids=mask[:, :prompt], cache=cache)
    steps = [model.logits(hidden)]
    for t in range(prompt, ids.shape[1]):
        hidden, cache = model.forward(model.embed(ids[:, t:t + 1]), positions=positions[:, t:t + 1],
                                      segment_ids=mask[:, t:t + 1], cache=cache)
        steps.append(model.logits(hidden))
    assert int(cache.index) == ids.shape[1]
    stepped = np.asarray(jnp.concatenate(steps, axis=1))
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(stepped[valid], np.asarray(full)[valid], atol=1e-5)


def test_chunked_token_logprobs_equal_log_softmax(model):
    ids, mask, _ = left_padded_batch(512, (13, 13), seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    hidden, _ = model.forward(model.embed(ids), positions=default_positions(mask), segment_ids=mask)
    targets = jnp.roll(ids, -1, axis=1)
    for temperature in (1.0, 0.7):
        expected = jnp.take_along_axis(jax.nn.log_softmax(model.logits(hidden) / temperature), targets[..., None],
                                       axis=-1)[..., 0]
        got = model.token_logprobs(hidden, targets, temperature=temperature, chunk_size=4)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_packed_segments_do_not_attend_across(model):
    rng = np.random.RandomState(0)
    a, b = rng.randint(1, 512, (1, 5)), rng.randint(1, 512, (1, 4))
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    segments = jnp.asarray([[1] * 5 + [2] * 4])
    positions = jnp.asarray([list(range(5)) + list(range(4))])
    hidden, _ = model.forward(model.embed(packed), positions=positions, segment_ids=segments)
    packed_logits = np.asarray(model.logits(hidden))
    np.testing.assert_allclose(packed_logits[:, :5], np.asarray(model(jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 5:], np.asarray(model(jnp.asarray(b))), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_keep_loss_and_gradients(tiny_qwen2, remat):
    config = Qwen2Config(**TINY_QWEN2["tied_gqa"])
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 8)))

    def loss(m):
        return -m.token_logprobs(m.forward(m.embed(ids), positions=default_positions(jnp.ones_like(ids)),
                                           segment_ids=jnp.ones_like(ids))[0], ids).mean()

    plain = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    rematted = Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2["tied_gqa"], remat=remat), rngs=nnx.Rngs(0))
    value_a, grads_a = nnx.value_and_grad(loss)(plain)
    value_b, grads_b = nnx.value_and_grad(loss)(rematted)
    np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-6)


def test_abstract_qwen2_5_3b_parameter_count_without_allocating():
    config = qwen2_preset("qwen2.5-3b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    count = hf.parameter_count(abstract)
    assert count == config.num_parameters
    assert 3.08e9 < count < 3.10e9, count


def test_bad_positions_and_masks_are_rejected(model):
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        model.forward(model.embed(ids), positions=jnp.zeros((3, 2, 5), jnp.int32), segment_ids=jnp.ones_like(ids))
