"""Qwen2.5-VL in flax.nnx (device side): vision tower, multimodal merge and the VL model.

The vision tower (Conv3d patch embedding, 2-D rotary, window attention with a few full-attention blocks,
SwiGLU MLPs, 2x2 patch merger) runs on static, bucketed shapes, in the **padded window** layout that
`qwen2_5_vl_inputs.plan_vision_inputs` builds on the host:

- window blocks attend inside each row (never a `[total_patches]^2` mask);
- full-attention blocks gather the windows of each image into `[num_images, windows_per_image * window_len]`
  rows (attention does not depend on the order of keys, so no patch-level reorder is needed), attend in
  bounded query blocks, and gather the windows back;
- the merger works on whole 2x2 merge units, which never straddle a window row;
- one last gather puts the merged tokens in Hugging Face order (image after image, raster order).

The language half is `Qwen2ForCausalLM` (m2io_jax.models.qwen2) driven with 3-D (temporal, height, width)
positions. The VL model implements the `CausalLM` protocol (m2io_jax.models.protocol): it prepares prompts
with their images on the host, computes vision features once, and hands the merged embeddings to the
decoder's prefill and log-prob passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2io_jax.models import qwen2_5_vl_inputs as host
from m2io_jax.models.attention import check_attention_impl
from m2io_jax.models.kernels import splash
from m2io_jax.models.layers import MASKED_SCORE, param
from m2io_jax.models.protocol import PrefixCache, PreparedInputs, SuffixCache
from m2io_jax.models.qwen2 import Qwen2ForCausalLM, StackedLayers, apply_rope, rms_norm, with_remat
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionConfig
from m2io_jax.models.qwen2_5_vl_inputs import VisionInputs, prepare_inputs
from m2io_jax.sharding import constrain


def _vision_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
                  init: str = "normal", fan_in: int | None = None) -> nnx.Param:
    """A vision weight: truncated normal with std 1 / sqrt(fan_in) (default: the first dimension), or ones/zeros."""
    if init != "normal":
        return param(rngs, shape, axes, dtype, init=init)
    return param(rngs, shape, axes, dtype, init="truncated_normal", std=(fan_in or shape[0]) ** -0.5)


def vision_rotary(patch_hw: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[..., head_dim]` of the 2-D rotary: half the frequencies on the row, half on the column."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
    freqs = patch_hw.astype(jnp.float32)[..., None] * inv_freq  # [..., 2, head_dim/4]
    freqs = freqs.reshape(*patch_hw.shape[:-1], 2 * quarter)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Bidirectional softmax attention in the heads-major layout.

    q `[..., H, Q, d]` (already scaled by d**-0.5), k, v `[..., H, K, d]`, key_valid `[..., K]` bool. Scores
    and softmax statistics are float32; the softmax denominator divides the `[Q, d]` output instead of the
    `[Q, K]` probabilities, one pass less over the largest tensor. A row whose keys are all padding gets a
    finite (meaningless) output, never NaN.
    """
    scores = jnp.einsum("...hqd,...hkd->...hqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(key_valid[..., None, None, :], scores, MASKED_SCORE)  # key_valid [..., 1, 1, K]
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("...hqk,...hkd->...hqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(probs, axis=-1, keepdims=True)).astype(v.dtype)


def query_block_size(num_rows: int, num_heads: int, row_len: int, max_scores: int) -> int:
    """The largest divisor of `row_len` such that one step's scores `[rows, heads, block, row_len]` fit."""
    limit = max(1, max_scores // (num_rows * num_heads * row_len))
    return max(d for d in range(1, min(limit, row_len) + 1) if row_len % d == 0)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, max_scores: int) -> jax.Array:
    """`attention` over long rows, a block of query rows per loop step: q, k, v `[N, H, S, d]`, key_valid `[N, S]`.

    Rows and heads stay batch dimensions of every step (they keep their sharding); only the query axis is
    looped, so at most `max_scores` scores exist at a time.
    """
    n, h, s, d = q.shape
    block = query_block_size(n, h, s, max_scores)
    if block == s:
        return attention(q, k, v, key_valid)
    blocks = jnp.moveaxis(q.reshape(n, h, s // block, block, d), 2, 0)  # [S / block, N, H, block, d]
    out = jax.lax.map(lambda q_block: attention(q_block, k, v, key_valid), blocks)
    return jnp.moveaxis(out, 0, 2).reshape(n, h, s, d)


class VisionBlocks(StackedLayers):
    """All vision blocks' weights stacked on a leading `vision_layers` axis (scanned in `VisionTower`).

    Window and full-attention blocks have the same weights; which attention a block runs is a per-layer flag
    of the scan, so the tower compiles one block body whatever its depth.
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        n, d, h, hd, f = config.depth, config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
        dt = config.param_dtype
        layers = ("vision_layers",)

        def p(shape, axes, init="normal", fan_in=None):
            return _vision_param(rngs, (n, *shape), layers + axes, dt, init, fan_in)

        self.norm1 = p((d,), ("vision_norm",), "ones")
        self.norm2 = p((d,), ("vision_norm",), "ones")
        self.qkv = p((d, 3, h, hd), ("vision_embed", None, "vision_heads", "vision_head_dim"), fan_in=d)
        self.qkv_bias = p((3, h, hd), (None, "vision_heads", "vision_head_dim"), "zeros")
        self.proj = p((h, hd, d), ("vision_heads", "vision_head_dim", "vision_embed"), fan_in=d)
        self.proj_bias = p((d,), ("vision_embed",), "zeros")
        self.gate = p((d, f), ("vision_embed", "vision_mlp"), fan_in=d)
        self.gate_bias = p((f,), ("vision_mlp",), "zeros")
        self.up = p((d, f), ("vision_embed", "vision_mlp"), fan_in=d)
        self.up_bias = p((f,), ("vision_mlp",), "zeros")
        self.down = p((f, d), ("vision_mlp", "vision_embed"), fan_in=f)
        self.down_bias = p((d,), ("vision_embed",), "zeros")


def _full_attention(config: VisionConfig, q: jax.Array, k: jax.Array, v: jax.Array,
                    inputs: VisionInputs, attention_impl: str) -> jax.Array:
    """Attention over all patches of each image: windows -> one row per image -> attention -> windows.

    q, k, v `[W, H, L, hd]` -> `[W, H, L, hd]`; attention_impl "pallas": splash attention (no query blocks).
    """
    _, heads, length, hd = q.shape
    images, per_image = inputs.image_windows.shape
    q, k, v = (jnp.swapaxes(a[inputs.image_windows], 1, 2).reshape(images, heads, -1, hd)
               for a in (q, k, v))  # [I, H, V * L, hd]
    if attention_impl == "pallas":
        out = splash.bidirectional_attention(q, k, v, inputs.image_valid)
    else:
        out = blocked_attention(q, k, v, inputs.image_valid, config.full_attention_block_scores)
    out = jnp.swapaxes(out.reshape(images, heads, per_image, length, hd), 1, 2).reshape(-1, heads, length, hd)
    return out[inputs.window_slot]  # [W, H, L, hd]


def vision_block(config: VisionConfig, attention_impl: str, x: jax.Array, w: dict[str, jax.Array], cos: jax.Array,
                 sin: jax.Array, inputs: VisionInputs, full_attention: jax.Array) -> jax.Array:
    """One pre-norm block: (window or full) attention with 2-D rotary, then a SwiGLU MLP.

    x `[W, L, D]` in the window layout; w: one layer's weights; cos, sin `[W, L, head_dim]`; full_attention: a
    boolean scalar choosing the attention (`lax.cond`: only the chosen one runs); attention_impl: "xla" or
    "pallas" (splash attention, `m2io_jax.models.kernels.splash`).
    """
    h = rms_norm(x, w["norm1"], config.rms_norm_eps)
    qkv = jnp.einsum("wld,dshe->wlshe", h, w["qkv"]) + w["qkv_bias"]
    # Rotary in float32 as transformers does, the softmax scale folded into q, then heads-major [W, H, L, hd].
    q = apply_rope(qkv[:, :, 0].astype(jnp.float32), cos, sin) * config.head_dim**-0.5
    k = apply_rope(qkv[:, :, 1].astype(jnp.float32), cos, sin)
    q, k, v = (jnp.swapaxes(a.astype(x.dtype), 1, 2) for a in (q, k, qkv[:, :, 2]))
    window = splash.bidirectional_attention if attention_impl == "pallas" else attention
    out = jax.lax.cond(full_attention, lambda: _full_attention(config, q, k, v, inputs, attention_impl),
                       lambda: window(q, k, v, inputs.window_valid))
    x = x + jnp.einsum("whle,hed->wld", out, w["proj"]) + w["proj_bias"]
    h = rms_norm(x, w["norm2"], config.rms_norm_eps)
    gate = h @ w["gate"] + w["gate_bias"]
    up = h @ w["up"] + w["up_bias"]
    return x + (jax.nn.silu(gate) * up) @ w["down"] + w["down_bias"]


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 merge unit (4 consecutive patches) -> Linear, GELU, Linear into the text width."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        d, dt = config.hidden_size, config.param_dtype
        wide = d * config.merge_unit
        self.config = config
        self.ln_q = _vision_param(rngs, (d,), ("vision_norm",), dt, "ones")
        self.fc1 = _vision_param(rngs, (wide, wide), ("vision_embed", "vision_mlp"), dt)
        self.fc1_bias = _vision_param(rngs, (wide,), ("vision_mlp",), dt, "zeros")
        self.fc2 = _vision_param(rngs, (wide, config.out_hidden_size), ("vision_mlp", "embed"), dt)
        self.fc2_bias = _vision_param(rngs, (config.out_hidden_size,), ("embed",), dt, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[W, L, D]` -> `[W * L / merge_unit, out_hidden_size]`."""
        cfg, dt = self.config, self.config.dtype
        x = rms_norm(x, self.ln_q[...].astype(dt), cfg.rms_norm_eps)
        x = x.reshape(-1, cfg.hidden_size * cfg.merge_unit)
        x = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=False)
        return x @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class VisionTower(nnx.Module):
    """The Qwen2.5-VL vision transformer: window-layout patches in, merged features (HF order) out.

    attention_impl: one of `m2io_jax.models.attention.ATTENTION_IMPLS` (the VL model passes its decoder's).
    """

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, attention_impl: str = "xla"):
        check_attention_impl(attention_impl, "VisionTower")
        self.config = config
        self.attention_impl = attention_impl
        self.patch_embed = _vision_param(rngs, (config.patch_dim, config.hidden_size), ("vision_patch", "vision_embed"),
                                  config.param_dtype)
        self.blocks = VisionBlocks(config, rngs=rngs)
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Returns `[F, out_hidden_size]` merged features; rows past the batch's real feature count are padding."""
        cfg, dt = self.config, self.config.dtype
        x = jnp.einsum("wlp,pd->wld", inputs.patches.astype(dt), self.patch_embed[...].astype(dt))
        x = constrain(x, ("batch", None, "act_embed"))  # windows spread over the data-parallel axes
        cos, sin = vision_rotary(inputs.patch_hw, cfg.head_dim)
        block = with_remat(functools.partial(vision_block, cfg, self.attention_impl), cfg.remat)
        full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

        def step(x, layer):
            w, full_attention = layer
            return constrain(block(x, w, cos, sin, inputs, full_attention), ("batch", None, "act_embed")), None

        x, _ = jax.lax.scan(step, x, (self.blocks.stacked(dt), jnp.asarray(full)))
        return self.merger(x)[inputs.feature_gather]



# ------------------------------------------------------------------------------------------- the VL model


def merge_image_features(inputs_embeds: jax.Array, features: jax.Array, index: jax.Array) -> jax.Array:
    """Replaces the embeddings of image tokens, in order, by vision features.

    inputs_embeds `[B, T, D]`, features `[F, D]`, index `[B, T]` (-1: keep the text embedding).
    """
    picked = jnp.take(features.astype(inputs_embeds.dtype), jnp.maximum(index, 0), axis=0)  # [B, T, D]
    return jnp.where((index >= 0)[..., None], picked, inputs_embeds)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL: vision tower + Qwen2 decoder (`language_model`) with M-RoPE; a `CausalLM` (models.protocol)."""

    model_type = "qwen2_5_vl"

    def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = VisionTower(config.vision, rngs=rngs, attention_impl=config.text.attention_impl)
        self.language_model = Qwen2ForCausalLM(config.text, rngs=rngs)

    def encode_images(self, vision: VisionInputs) -> jax.Array:
        """Vision features `[F, D]` of a prepared image batch (compute once per prompt, pass back in)."""
        return self.visual(vision)

    def embed(self, input_ids: jax.Array, *, image_token_index: jax.Array | None = None,
              vision: VisionInputs | None = None, vision_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings `[B, T, D]` with the image tokens replaced by vision features."""
        embeds = self.language_model.embed(input_ids)
        if vision_features is None and vision is not None:
            vision_features = self.encode_images(vision)
        if vision_features is None:
            return embeds
        if image_token_index is None:
            raise ValueError("image_token_index is needed to place vision features")
        return merge_image_features(embeds, vision_features, image_token_index)

    def forward(self, input_ids: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                image_token_index: jax.Array | None = None, vision: VisionInputs | None = None,
                vision_features: jax.Array | None = None, cache: Any = None) -> tuple[jax.Array, Any]:
        """Final-normed hidden states `[B, T, D]` and the KV cache (see `Qwen2ForCausalLM.forward`)."""
        embeds = self.embed(input_ids, image_token_index=image_token_index, vision=vision,
                            vision_features=vision_features)
        return self.language_model.forward(embeds, positions=positions, segment_ids=segment_ids, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)

    def token_logprobs(self, hidden: jax.Array, targets: jax.Array, **kwargs: Any) -> jax.Array:
        return self.language_model.token_logprobs(hidden, targets, **kwargs)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> Any:
        return self.language_model.init_cache(batch_size, max_length, dtype)

    def __call__(self, input_ids: Any, pixel_values: Any | None = None, image_grid_thw: Any | None = None,
                 attention_mask: Any | None = None) -> jax.Array:
        """Logits `[B, T, vocab]` float32 from inputs as transformers' processor returns them (numpy)."""
        inputs = prepare_inputs(self.config, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw)
        return logits_from_inputs(self, inputs)

    # ------------------------------------------------------------------------------ CausalLM protocol: host
    @property
    def vocab_size(self) -> int:
        return self.config.text.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def vision_parameters(self) -> str | None:
        return "visual"

    def prepare_prompts(self, prompts: Sequence[Sequence[int]], images: Sequence[Any] | None, *, rows: int,
                        length: int) -> PreparedInputs:
        """Left-padded prompts with M-RoPE positions and their images' layout (see `CausalLM.prepare_prompts`)."""
        return host.prepare_prompt_batch(self.config, prompts, images, rows=rows, length=length)

    def placeholder_prompts(self, batch_size: int, prompt_length: int, image_grid_thw: Any | None,
                            ) -> tuple[list[list[int]], list[Any] | None]:
        return host.placeholder_prompts(self.config, batch_size, prompt_length, image_grid_thw)

    # ---------------------------------------------------------------------------- CausalLM protocol: device
    def encode_vision(self, inputs: PreparedInputs) -> jax.Array | None:
        """Vision features `[F, D]` of the batch's images (None without images)."""
        return None if inputs.vision is None else self.encode_images(inputs.vision)

    def prompt_embeds(self, inputs: PreparedInputs, vision_features: jax.Array | None) -> jax.Array:
        """Prompt embeddings `[B, P, D]` with image tokens replaced (the tower runs when features are None)."""
        return self.embed(inputs.ids, image_token_index=inputs.image_index, vision=inputs.vision,
                          vision_features=vision_features)

    def prefill(self, inputs: PreparedInputs, vision_features: jax.Array | None = None,
                ) -> tuple[jax.Array, PrefixCache]:
        return self.language_model.prefill_embeds(self.prompt_embeds(inputs, vision_features), inputs)

    def init_suffix_cache(self, batch_size: int, num_samples: int, length: int) -> SuffixCache:
        return self.language_model.init_suffix_cache(batch_size, num_samples, length)

    def decode_step(self, tokens: jax.Array, prefix: PrefixCache, suffix: SuffixCache, slot: jax.Array, *,
                    span: int) -> tuple[jax.Array, SuffixCache]:
        """Generated tokens are text: the decoder's own step (M-RoPE deltas are in `prefix.next_position`)."""
        return self.language_model.decode_step(tokens, prefix, suffix, slot, span=span)

    def completion_logprobs(self, inputs: PreparedInputs, completions: jax.Array,
                            vision_features: jax.Array | None = None, *, temperature: float = 1.0,
                            suppress_tokens: Sequence[int] = ()) -> jax.Array:
        return self.language_model.completion_logprobs_embeds(
            self.prompt_embeds(inputs, vision_features), inputs, completions, temperature=temperature,
            suppress_tokens=suppress_tokens)


def logits_from_inputs(model: Qwen2_5_VLForConditionalGeneration, inputs: PreparedInputs) -> jax.Array:
    """Logits `[B, T, vocab]` float32 of host-prepared inputs (e.g. `Qwen2_5_VLProcessor(...).model_inputs`).

    Compiled once per (text length, vision bucket) shape combination.
    """
    return _logits_jit(model, inputs)


@nnx.jit
def _logits_jit(model: Qwen2_5_VLForConditionalGeneration, inputs: PreparedInputs) -> jax.Array:
    hidden, _ = model.forward(inputs.ids, positions=inputs.positions, segment_ids=inputs.mask,
                              image_token_index=inputs.image_index, vision=inputs.vision)
    return model.logits(hidden)
