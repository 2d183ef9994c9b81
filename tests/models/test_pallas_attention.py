"""`attention_impl="pallas"` on the whole model: the tiny Qwen2.5-VL gives the XLA path's logits, log-prob
gradients and sampled tokens (kernels in Pallas interpret mode on CPU), and its programs lowered for a real TPU
topology contain the kernels as Mosaic custom calls (`tpu_custom_call`; needs libtpu, the `tpu` extra)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import sampling
from m2io_jax.models import from_pretrained
from m2io_jax.models.qwen2_5_vl import logits_from_inputs
from tests.models.qwen2_5_vl_helpers import conversation, random_image

CHATS = [conversation(1), conversation(1, "A cat sits on a red mat by the door.")]  # one image each
SIZES = [(200, 300), (90, 150)]  # the second needs window padding


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """The same weights (scaled up, so logits are far from uniform and greedy steps far from ties) with the XLA
    and the Pallas attention."""
    xla = from_pretrained(tiny_checkpoint)
    nnx.update(xla, jax.tree.map(lambda x: x * 3.0, nnx.state(xla, nnx.Param)))
    pallas = from_pretrained(tiny_checkpoint, overrides={"text.attention_impl": "pallas"})
    nnx.update(pallas, nnx.state(xla, nnx.Param))
    assert pallas.config.text.attention_impl == "pallas" and pallas.visual.attention_impl == "pallas"
    return xla, pallas


@pytest.fixture(scope="module")
def images():
    return [[random_image(h, w, seed=i)] for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def batch(processor, images):
    batch = processor(CHATS, images=images)
    assert batch.attention_mask.min() == 0 and batch.image_grid_thw.shape[0] == 2  # left padding, two images
    return batch


def test_logits_equal_xla(models, batch):
    xla, pallas = models
    inputs = batch.model_inputs
    expected = np.asarray(logits_from_inputs(xla, inputs))
    actual = np.asarray(logits_from_inputs(pallas, inputs))
    real = np.asarray(batch.attention_mask, bool)  # padding positions attend to nothing in either path
    np.testing.assert_allclose(actual[real], expected[real], atol=1e-4, rtol=1e-5)
    assert float(expected[real].std()) > 1.0


def test_logprob_gradients_equal_xla(models, batch):
    """GRPO's log-prob pass: prefill (causal splash), completions over the shared prompt (splash with the
    shared-prefix mask) and the vision tower (window and full-attention splash), differentiated."""
    xla, pallas = models
    inputs = batch.model_inputs
    completions = jnp.asarray(np.random.RandomState(0).randint(10, 400, (2, 2, 4)), jnp.int32)
    weights = jnp.asarray(np.random.RandomState(1).standard_normal(completions.shape), jnp.float32)

    @nnx.jit
    def grads(model, inputs):
        return nnx.grad(lambda m: jnp.sum(weights * m.completion_logprobs(inputs, completions)))(model)

    expected, actual = grads(xla, inputs), grads(pallas, inputs)
    leaves = jax.tree.leaves_with_path(expected)
    assert len(leaves) == len(jax.tree.leaves(actual))
    for (path, e), a in zip(leaves, jax.tree.leaves(actual)):
        scale = max(float(jnp.abs(e).max()), 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    vision = nnx.state(expected, nnx.Param)["visual"]["blocks"]["qkv"][...]
    assert float(jnp.abs(vision).max()) > 0  # gradients reach the vision tower through the kernels


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 3)])
def test_sampling_gives_the_same_tokens(models, processor, images, temperature, seed):
    xla, pallas = models
    rows = [processor([chat], images=[imgs]) for chat, imgs in zip(CHATS, images)]
    prompts = [row.input_ids[0].tolist() for row in rows]
    kwargs = dict(max_new_tokens=6, num_samples=2, temperature=temperature, seed=seed, images=rows)
    expected = sampling.generate(xla, prompts, **kwargs)
    actual = sampling.generate(pallas, prompts, **kwargs)
    assert actual.tokens == expected.tokens
    np.testing.assert_allclose(np.array(actual.logprobs), np.array(expected.logprobs), atol=1e-4)
    if temperature > 0:
        assert len({tuple(t) for t in expected.tokens}) > 1  # seeded draws that differ across samples


@pytest.mark.slow
def test_tpu_programs_contain_the_kernels():
    """Training (log-prob gradients) and sampling (prefill, one decode step) of a Qwen2.5-VL with real head
    sizes (text 128, vision 80), lowered and compiled for a v5e 2x2 topology on a sharded mesh: splash's forward
    and backward kernels and the decode kernel are Mosaic custom calls, and Mosaic accepts them. Without
    libtpu the topology cannot be made and this fails."""
    from jax.experimental import topologies

    from m2io_jax.models.qwen2 import Qwen2Config
    from m2io_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionConfig
    from m2io_jax.sharding import make_mesh, state_shardings

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lock file
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=topology.devices)
    text = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=128, mrope_section=(16, 24, 24),
                       max_position_embeddings=4096, dtype=jnp.bfloat16, attention_impl="pallas")
    vision = VisionConfig(depth=2, hidden_size=160, intermediate_size=256, num_heads=2, out_hidden_size=256,
                          fullatt_block_indexes=(1,), dtype=jnp.bfloat16)
    config = Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=5, video_token_id=6,
                              vision_start_token_id=3, vision_end_token_id=4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0))))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                            state_shardings(state, mesh))
    model = nnx.merge(graphdef, state)
    prompts, images = model.placeholder_prompts(4, 256, np.array([[1, 16, 16], [1, 8, 24]]))
    inputs = model.prepare_prompts(prompts, images, rows=4, length=256)
    completions = np.ones((4, 8, 64), np.int32)

    def train(state, inputs, completions):
        loss = lambda m: jnp.sum(m.completion_logprobs(inputs, completions))  # noqa: E731
        return nnx.grad(loss)(nnx.merge(graphdef, state))

    def sample(state, inputs, tokens):
        m = nnx.merge(graphdef, state)
        _, prefix = m.prefill(inputs)
        return m.decode_step(tokens, prefix, m.init_suffix_cache(4, 8, 64), jnp.int32(3), span=64)[0]

    with jax.set_mesh(mesh):
        programs = {"train": jax.jit(train).lower(abstract, inputs, completions).compile().as_text(),
                    "sample": jax.jit(sample).lower(abstract, inputs, completions[..., 0]).compile().as_text()}
    assert "tpu_custom_call" in programs["train"]
    for kernel in ("splash_mqa_fwd_segmented", "splash_mqa_dkv_segmented", "splash_mqa_dq_segmented"):
        assert kernel in programs["train"], kernel
    assert "shared_prefix_decode" in programs["sample"] and "splash_mqa_fwd_segmented" in programs["sample"]
