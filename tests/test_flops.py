"""Analytic FLOPs against XLA's count of the same programs, compiled for the CPU.

One decoder layer and completions within one log-prob chunk: XLA's `cost_analysis` counts a loop body once,
whatever its trip count, so with every loop of length one its count is the whole program's. Elementwise work
is why XLA's count is a little above ours (matmuls only); the models are wide enough that it stays under 10%.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import flops
from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from m2io_jax.models.qwen2_5_vl_config import VisionConfig

CONFIG = Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
B, G, P, N = 2, 4, 96, 32


def xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def abstract_model(config: Qwen2Config):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    return graphdef, state


def prompts(model_config: Qwen2Config):
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(0)))
    inputs = model.prepare_prompts([[1] * P] * B, None, rows=B, length=P)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), inputs)


def assert_close(analytic: float, counted: float, tolerance: float = 0.1):
    assert abs(analytic - counted) <= tolerance * counted, f"analytic {analytic:.4g} vs XLA {counted:.4g}"


def test_linear_flops_are_twice_the_layer_matrices():
    c = dataclasses.replace(CONFIG, num_hidden_layers=3)
    _, state = abstract_model(c)
    matrices = sum(np.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(state)
                   if "layers" in str(path[0]) and len(x.shape) >= 3 and "bias" not in str(path))
    assert flops.linear_per_token(c) == 2 * matrices


def test_prefill_and_decode_step_match_xla():
    graphdef, state = abstract_model(CONFIG)
    inputs = prompts(CONFIG)

    def prefill(state, inputs):
        return nnx.merge(graphdef, state).prefill(inputs)

    assert_close(flops.prefill(CONFIG, B, P).total, xla_flops(prefill, state, inputs))

    span = 16
    prefix = jax.eval_shape(prefill, state, inputs)[1]
    suffix = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_suffix_cache(B, G, N))

    def decode(state, tokens, prefix, suffix):
        return nnx.merge(graphdef, state).decode_step(tokens, prefix, suffix, jnp.int32(3), span=span)

    tokens = jax.ShapeDtypeStruct((B, G), jnp.int32)
    assert_close(flops.decode_step(CONFIG, B, G, P, span).total, xla_flops(decode, state, tokens, prefix, suffix))


def test_update_is_forward_and_backward():
    """Without remat (XLA merges a one-layer program's recomputed forward with the forward itself, so remat
    cannot be checked here; the compile report's test checks it on a TPU program with a layer loop)."""
    graphdef, state = abstract_model(CONFIG)
    inputs = prompts(CONFIG)
    completions = jax.ShapeDtypeStruct((B, G, N), jnp.int32)

    def loss(state, inputs, completions):
        return nnx.merge(graphdef, state).completion_logprobs(inputs, completions).sum()

    assert_close(flops.completion_logprobs(CONFIG, B, G, P, N).total, xla_flops(loss, state, inputs, completions))
    assert_close(flops.grpo_update(CONFIG, B, G, P, N).total, xla_flops(jax.grad(loss), state, inputs, completions))


def test_remat_adds_the_recomputed_forward():
    forward = flops.completion_logprobs(CONFIG, B, G, P, N)
    plain = flops.grpo_update(CONFIG, B, G, P, N)
    full = flops.grpo_update(dataclasses.replace(CONFIG, remat="full"), B, G, P, N)
    dots = flops.grpo_update(dataclasses.replace(CONFIG, remat="save_dots"), B, G, P, N)
    assert plain.linear == pytest.approx(3 * forward.linear) and plain.head == pytest.approx(4 * forward.head)
    assert full.total - plain.total == pytest.approx(forward.linear + forward.attention)
    assert dots.total - plain.total == pytest.approx(forward.attention)


def test_lora_backward_skips_weight_gradients():
    full = flops.grpo_update(CONFIG, B, G, P, N)
    adapted = flops.grpo_update(CONFIG, B, G, P, N, lora=True)
    forward = flops.completion_logprobs(CONFIG, B, G, P, N)
    assert full.linear == pytest.approx(3 * forward.linear)
    assert adapted.linear == pytest.approx(2 * forward.linear)
    assert adapted.attention == full.attention


def test_vision_forward_counts_window_and_full_attention():
    v = VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                     fullatt_block_indexes=(3,), window_size=112)
    one = flops.vision_forward(v, [(1, 16, 16)])  # 256 patches: 4 windows of 64
    two = flops.vision_forward(v, [(1, 16, 16), (1, 16, 16)])
    assert two.total == pytest.approx(2 * one.total)
    windows_only = flops.vision_forward(dataclasses.replace(v, fullatt_block_indexes=()), [(1, 16, 16)])
    assert one.attention - windows_only.attention == pytest.approx(4 * 64 * (256 ** 2 - 4 * 64 ** 2))


def test_rollout_reads_the_stage_spans():
    n = 128
    staged = flops.rollout(CONFIG, B, G, P, n)
    flat = flops.rollout(CONFIG, B, G, P, n, spans=(n,))
    assert staged.linear == flat.linear
    assert staged.attention < flat.attention
    steps = functools.reduce(lambda a, b: a + b, [flops.decode_step(CONFIG, B, G, P, n)] * (n - 1))
    assert flat.total == pytest.approx((flops.prefill(CONFIG, B, P) + steps).total)
