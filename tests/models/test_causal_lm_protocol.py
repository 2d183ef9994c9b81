"""The CausalLM protocol's GRPO log-prob pass (G completions over one shared prompt) against the full layout.

The full layout is what a trainer without prefix sharing runs: each completion concatenated to its own copy of
the prompt (G rows per prompt), positions and image features prepared from scratch for those rows, one ordinary
forward. Log-probs and parameter gradients must agree in float32, for the text model and for Qwen2.5-VL with
images and left padding; the shared layout must cost under half the compiled FLOPs at G=8 on a long prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, default_positions
from m2io_jax.models.qwen2_5_vl_inputs import prepare_inputs
from tests.conftest import TINY_QWEN2
from tests.models.qwen2_5_vl_helpers import conversation, images_for


def text_model(**overrides) -> Qwen2ForCausalLM:
    config = Qwen2Config(**{**TINY_QWEN2["tied_gqa"], **overrides})
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 init, so that log-probs are far from uniform and differences show.
    nnx.update(model, jax.tree.map(lambda x: x * 3.0, nnx.state(model, nnx.Param)))
    return model


def random_completions(shape, seed: int, low: int = 10, high: int = 400) -> np.ndarray:
    return np.random.RandomState(seed).randint(low, high, shape).astype(np.int32)


def text_full_layout(model: Qwen2ForCausalLM, inputs, completions, temperature: float = 1.0) -> jax.Array:
    """[B, G, N] log-probs from B * G rows of prompt + completion through the ordinary forward."""
    b, g, n = completions.shape
    p = inputs.ids.shape[1]
    ids = jnp.concatenate([jnp.repeat(inputs.ids, g, axis=0), completions.reshape(b * g, n)], axis=1)
    mask = jnp.concatenate([jnp.repeat(inputs.mask, g, axis=0), jnp.ones((b * g, n), jnp.int32)], axis=1)
    hidden, _ = model.forward(model.embed(ids), positions=default_positions(mask), segment_ids=mask)
    lp = model.token_logprobs(hidden[:, :-1], ids[:, 1:], temperature=temperature)[:, p - 1:]
    return lp.reshape(b, g, n)


def assert_same_gradients(shared_loss, full_loss, model) -> None:
    shared = nnx.grad(shared_loss)(model)
    full = nnx.grad(full_loss)(model)
    leaves = jax.tree.leaves_with_path(shared)
    assert len(leaves) == len(jax.tree.leaves(full))
    for (path, a), b in zip(leaves, jax.tree.leaves(full)):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(jax.tree.leaves(full)[0]).max()) > 0


@pytest.fixture(scope="module")
def text_case():
    model = text_model()
    prompts = [np.random.RandomState(1).randint(1, 512, n).tolist() for n in (9, 4)]  # left padding in row 1
    inputs = model.prepare_prompts(prompts, None, rows=2, length=12)
    return model, inputs, jnp.asarray(random_completions((2, 3, 6), seed=2))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_text_shared_prompt_logprobs_equal_full_layout(text_case, temperature):
    model, inputs, completions = text_case
    shared = jax.jit(lambda m, x, c: m.completion_logprobs(x, c, temperature=temperature))(model, inputs, completions)
    full = text_full_layout(model, inputs, completions, temperature)
    assert shared.shape == completions.shape and shared.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(shared), np.asarray(full), atol=1e-5, rtol=1e-5)
    assert float(jnp.std(full)) > 0.1  # log-probs that differ across tokens: a real comparison


def test_text_shared_prompt_gradients_equal_full_layout(text_case):
    model, inputs, completions = text_case
    weights = jnp.asarray(np.random.RandomState(3).standard_normal(completions.shape), jnp.float32)
    assert_same_gradients(lambda m: jnp.sum(weights * m.completion_logprobs(inputs, completions)),
                          lambda m: jnp.sum(weights * text_full_layout(m, inputs, completions)), model)


def test_single_token_completions(text_case):
    model, inputs, completions = text_case
    np.testing.assert_allclose(np.asarray(model.completion_logprobs(inputs, completions[:, :, :1])),
                               np.asarray(text_full_layout(model, inputs, completions[:, :, :1])), atol=1e-5)


def test_shared_prompt_pass_costs_under_half_the_full_layout_flops():
    model = text_model()
    prompts = [np.random.RandomState(4).randint(1, 512, 512).tolist() for _ in range(2)]
    inputs = model.prepare_prompts(prompts, None, rows=2, length=512)
    completions = jnp.asarray(random_completions((2, 8, 32), seed=5))

    def flops(fn) -> float:
        cost = jax.jit(fn).lower(model, inputs, completions).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    shared = flops(lambda m, x, c: m.completion_logprobs(x, c))
    full = flops(text_full_layout)
    assert 0 < shared < 0.5 * full, (shared, full)


def test_attention_impl_is_checked():
    assert Qwen2Config(**TINY_QWEN2["tied_gqa"]).attention_impl == "xla"
    assert Qwen2Config(**TINY_QWEN2["tied_gqa"], attention_impl="pallas").attention_impl == "pallas"
    with pytest.raises(ValueError, match=r"Qwen2Config: attention_impl='flash'; expected one of xla, pallas"):
        Qwen2Config(**TINY_QWEN2["tied_gqa"], attention_impl="flash")


def test_text_model_refuses_images(text_case):
    model, _, _ = text_case
    with pytest.raises(ValueError, match=r"images\[1\] was given but Qwen2ForCausalLM is a text-only model"):
        model.prepare_prompts([[1, 2], [3]], [None, {"pixel_values": np.zeros((4, 4))}], rows=2, length=4)


# ---------------------------------------------------------------------------------------------- Qwen2.5-VL


VL_PROMPTS = [(conversation(1), 1, 3), (conversation(2, "A cat sits on a red mat."), 2, 7)]  # (chat, images, seed)


@pytest.fixture(scope="module")
def vl_case(jax_model, processor):
    """The VL model, a left-padded two-prompt batch with 1 and 2 images, each prompt processed alone, completions."""
    images = [images_for(k, seed=seed) for _, k, seed in VL_PROMPTS]
    batch = processor([chat for chat, _, _ in VL_PROMPTS], images=images)
    assert batch.attention_mask.min() == 0  # left padding in play
    singles = [processor([chat], images=[imgs]) for (chat, _, _), imgs in zip(VL_PROMPTS, images)]
    return jax_model, batch, singles, random_completions((2, 2, 5), seed=6)


def vl_full_layout(model, batch, singles, completions: np.ndarray) -> jax.Array:
    """[B, G, N] log-probs of the VL model from B * G rows of prompt + completion, each row with its prompt's
    images, prepared from scratch on the host (positions, feature index, vision layout)."""
    b, g, n = completions.shape
    p = batch.input_ids.shape[1]
    ids = np.concatenate([np.repeat(batch.input_ids, g, axis=0), completions.reshape(b * g, n)], axis=1)
    mask = np.concatenate([np.repeat(batch.attention_mask, g, axis=0), np.ones((b * g, n), np.int32)], axis=1)
    rows = [singles[row] for row in range(b) for _ in range(g)]
    full = prepare_inputs(model.config, ids, attention_mask=mask,
                          pixel_values=np.concatenate([x.pixel_values for x in rows]),
                          image_grid_thw=np.concatenate([x.image_grid_thw for x in rows]))
    hidden, _ = model.forward(full.ids, positions=full.positions, segment_ids=full.mask,
                              image_token_index=full.image_index, vision=full.vision)
    return model.token_logprobs(hidden[:, :-1], jnp.asarray(ids[:, 1:]))[:, p - 1:].reshape(b, g, n)


def test_vl_shared_prompt_logprobs_equal_full_layout(vl_case):
    model, batch, singles, completions = vl_case
    inputs = batch.model_inputs
    shared = jax.jit(lambda m, x, c: m.completion_logprobs(x, c))(model, inputs, completions)
    full = vl_full_layout(model, batch, singles, completions)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(full), atol=1e-5, rtol=1e-5)
    features = model.encode_vision(inputs)  # computed once, reused: the same log-probs
    assert features.shape[0] >= int((batch.input_ids == model.config.image_token_id).sum())
    reused = jax.jit(lambda m, x, c, f: m.completion_logprobs(x, c, f))(model, inputs, completions, features)
    np.testing.assert_allclose(np.asarray(reused), np.asarray(shared), atol=1e-6, rtol=0)


def test_vl_shared_prompt_gradients_equal_full_layout(vl_case):
    model, batch, singles, completions = vl_case
    weights = jnp.asarray(np.random.RandomState(7).standard_normal(completions.shape), jnp.float32)
    assert_same_gradients(lambda m: jnp.sum(weights * m.completion_logprobs(batch.model_inputs, completions)),
                          lambda m: jnp.sum(weights * vl_full_layout(m, batch, singles, completions)), model)


def test_vl_prefill_then_decode_step_equals_full_layout(vl_case):
    """prefill + decode_step over G rows give the next-token logits of the full layout at every step."""
    model, batch, singles, completions = vl_case
    inputs = batch.model_inputs
    b, g, n = completions.shape

    @jax.jit
    def stepped(m, x, c):
        first, prefix = m.prefill(x)
        suffix = m.init_suffix_cache(b, g, n)
        logps = [jnp.broadcast_to(jax.nn.log_softmax(first)[:, None], (b, g, first.shape[-1]))]
        for slot in range(n - 1):
            logits, suffix = m.decode_step(c[:, :, slot], prefix, suffix, jnp.int32(slot), span=n)
            logps.append(jax.nn.log_softmax(logits))
        logp = jnp.stack(logps, axis=2)  # [B, G, N, V]
        return jnp.take_along_axis(logp, c[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(np.asarray(stepped(model, inputs, jnp.asarray(completions))),
                               np.asarray(vl_full_layout(model, batch, singles, completions)), atol=1e-5, rtol=0)


def test_vl_attention_impl_override_is_checked(tiny_checkpoint):
    from m2io_jax.models import from_pretrained

    with pytest.raises(ValueError, match=r"attention_impl='flash'; expected one of xla"):
        from_pretrained(tiny_checkpoint, overrides={"text.attention_impl": "flash"})
