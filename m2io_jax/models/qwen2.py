"""Qwen2 / Qwen2.5 decoder-only language model in flax.nnx.

Serves as the generator LM and as the language half of the Qwen2.5-VL inserter. Layers are stacked along a
leading `layers` axis and run with `lax.scan` (compile time independent of depth), with a configurable remat
policy. Parameters carry logical axis names (see `m2io_jax.sharding`).

Interface used by the rest of the package:
  embed(input_ids) -> inputs_embeds                        # [B, T, D]
  forward(inputs_embeds, positions=, segment_ids=, cache=) -> (hidden, cache)
      positions:   [B, T] (1-D RoPE) or [3, B, T] (M-RoPE, temporal/height/width, split by `mrope_section`)
      segment_ids: [B, T] int32; 0 marks padding; a token attends to earlier tokens of its own segment
                   (left padding: the attention mask; packing: one id per packed sequence)
      hidden:      final-normed hidden states [B, T, D]
  logits(hidden) -> [B, T, V] float32
  token_logprobs(hidden, targets) -> [B, T] float32, chunked over T: never materialises [B, T, V]
  __call__(input_ids, attention_mask=None) -> logits
  the `CausalLM` protocol (m2io_jax.models.protocol) for the sampler and the trainer: prepare_prompts,
  prefill, decode_step against a shared prompt prefix, completion_logprobs of G completions per prompt;
  `prefill_embeds` / `completion_logprobs_embeds` take prompt embeddings (the VL model's, images merged in).

Attention runs through `m2io_jax.models.attention`, chosen by `Qwen2Config.attention_impl`.

Causality is by sequence order (cache slot order with a KV cache), never by position values, so M-RoPE's
non-monotonic image positions need no special case.

KV cache layout (`KVCache`, a pytree): k and v `[L, B, S, KV, hd]` in the compute dtype, `segment_ids [B, S]`
(0 = empty slot or padding) and `index` (int32 scalar: the next slot to write; rows are left-padded so that one
index serves the whole batch). A forward over T new tokens writes slots [index, index + T) and returns the
cache with index + T.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from m2io_jax.models.attention import (
    CausalSegments,
    check_attention_impl,
    grouped_attention,
    shared_prefix_attention,
    shared_prefix_decode,
)
from m2io_jax.models.layers import param
from m2io_jax.models.protocol import PrefixCache, PreparedInputs, SuffixCache, left_pad, suppress_logits
from m2io_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def with_remat(layer: Callable[..., Any], remat: str) -> Callable[..., Any]:
    """`layer` wrapped in `jax.checkpoint` with the policy named `remat` (unchanged for "none")."""
    if remat == "none":
        return layer
    return jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Shape of a Qwen2 decoder plus how to run it (dtypes, remat)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    mrope_section: tuple[int, ...] | None = None  # Qwen2.5-VL: (16, 24, 24); sums to head_dim // 2
    initializer_range: float = 0.02
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "xla"  # one of models.attention.ATTENTION_IMPLS

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        check_attention_impl(self.attention_impl, "Qwen2Config")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if sum(self.mrope_section) != self.head_dim // 2 or min(self.mrope_section) < 1:
                raise ValueError(f"mrope_section={self.mrope_section} must be positive and sum to head_dim // 2 = "
                                 f"{self.head_dim // 2}")

    @property
    def num_parameters(self) -> int:
        """Parameter count from the shapes alone."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                           self.num_key_value_heads, self.head_dim)
        attention = d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d
        layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> "Qwen2Config":
        """Reads a Hugging Face Qwen2 (or Qwen2.5-VL `text_config`) dictionary.

        Raises ValueError naming `source` and the key for features this port does not implement.
        """
        def need(key: str) -> Any:
            if key not in hf:
                raise KeyError(f"{source}: missing key {key!r} required for a Qwen2 model")
            return hf[key]

        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (expected 'default' or 'mrope')")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported by this port")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        mrope = rope.get("mrope_section")
        fields = dict(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(hf.get("num_key_value_heads") or need("num_attention_heads")),
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            mrope_section=tuple(mrope) if mrope else None,
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `Qwen2Config` dictionary for this shape."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "dtype": "bfloat16" if _dtype_name(self.param_dtype) == "bfloat16" else "float32",
        }


@struct.dataclass
class KVCache:
    """Functional KV cache, stacked over layers (layout in the module docstring)."""

    k: jax.Array  # [L, B, S, KV, hd]
    v: jax.Array  # [L, B, S, KV, hd]
    segment_ids: jax.Array  # [B, S] int32, 0 = empty
    index: jax.Array  # [] int32, next slot to write

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back, then scaled (the Hugging Face Qwen2 order of operations)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for positions [B, T] (RoPE) or [3, B, T] (M-RoPE); returns cos, sin [B, T, head_dim] f32.

    M-RoPE gives rotary frequency pair f the position of section s(f), where the sections split the
    head_dim // 2 frequencies into `mrope_section` consecutive runs (temporal, height, width).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
    positions = positions.astype(jnp.float32)
    if positions.ndim == 2:
        angles = positions[..., None] * inv_freq  # [B, T, hd/2]
    elif positions.ndim == 3 and positions.shape[0] == 3:
        if mrope_section is None:
            raise ValueError("positions of shape [3, B, T] need a config with mrope_section")
        section = jnp.repeat(jnp.arange(3), jnp.asarray(mrope_section), total_repeat_length=head_dim // 2)
        per_freq = jnp.moveaxis(positions[section], 0, -1)  # [B, T, hd/2]
        angles = per_freq * inv_freq
    else:
        raise ValueError(f"positions must have shape [B, T] or [3, B, T]; got {positions.shape}")
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, hd]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd] rotated by cos/sin [B, T, hd] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class StackedLayers(nnx.Module):
    """Weights of identical layers stacked on a leading layer axis, run by `lax.scan` over `stacked()`."""

    def stacked(self, dtype: Any) -> dict[str, jax.Array]:
        """The stacked weights as plain arrays in the compute dtype, ready for `lax.scan`."""
        return {name: var[...].astype(dtype) for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class DecoderLayers(StackedLayers):
    """All decoder layers' weights, stacked on a leading `layers` axis (scanned in `Qwen2ForCausalLM`)."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = config
        n, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        def p(shape, axes, init="normal"):
            return param(rngs, shape, axes, c.param_dtype, init=init, std=c.initializer_range)

        self.input_norm = p((n, d), ("layers", "norm"), init="ones")
        self.q_proj = p((n, d, h, hd), ("layers", "embed", "heads", "head_dim"))
        self.q_bias = p((n, h, hd), ("layers", "heads", "head_dim"), init="zeros")
        self.k_proj = p((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.k_bias = p((n, kv, hd), ("layers", "kv_heads", "head_dim"), init="zeros")
        self.v_proj = p((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_bias = p((n, kv, hd), ("layers", "kv_heads", "head_dim"), init="zeros")
        self.o_proj = p((n, h, hd, d), ("layers", "heads", "head_dim", "embed"))
        self.post_norm = p((n, d), ("layers", "norm"), init="ones")
        self.gate_proj = p((n, d, f), ("layers", "embed", "mlp"))
        self.up_proj = p((n, d, f), ("layers", "embed", "mlp"))
        self.down_proj = p((n, f, d), ("layers", "mlp", "embed"))
        self.lora = nnx.data(None)  # LoRA adapters of the projections, attached by `m2io_jax.models.lora.apply`

    def stacked(self, dtype: Any) -> dict[str, jax.Array]:
        """The stacked weights (`StackedLayers.stacked`) plus the enabled LoRA factors under "<name>/lora_a" and
        "<name>/lora_b" (`project` adds their update)."""
        weights = super().stacked(dtype)
        if self.lora is not None:
            weights.update(self.lora.stacked(dtype))
        return weights


def project(x: jax.Array, w: dict[str, jax.Array], name: str, equation: str) -> jax.Array:
    """`einsum(equation, x, w[name])` plus, when `w` carries LoRA factors for `name`, their low-rank update
    (x @ A) @ B (the scale alpha / rank is folded into B by `LoraAdapters.stacked`).

    The factors' equations come from `equation`: A [*in, r] contracts the dimensions of x that the weight
    contracts, B [r, *out] produces the weight's output dimensions. Without factors this is the plain einsum.
    """
    y = jnp.einsum(equation, x, w[name])
    a = w.get(f"{name}/lora_a")
    if a is None:
        return y
    x_dims, rest = equation.split(",")
    w_dims, out_dims = rest.split("->")
    contracted = "".join(ch for ch in w_dims if ch in x_dims)
    produced = "".join(ch for ch in w_dims if ch not in x_dims)
    kept = "".join(ch for ch in x_dims if ch not in w_dims)
    low = jnp.einsum(f"{x_dims},{contracted}r->{kept}r", x, a)  # [..., r]
    return y + jnp.einsum(f"{kept}r,r{produced}->{out_dims}", low, w[f"{name}/lora_b"])


def project_qkv(
    config: Qwen2Config, x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """First half of a decoder layer: pre-norm, Q/K/V projections, rotary on Q and K.

    x [B, T, D]; w: one layer's weights -> q [B, T, H, hd], k and v [B, T, KV, hd]. Shared with the sampler,
    whose decode step attends differently (shared prompt cache) but projects the same way.
    """
    h = rms_norm(x, w["input_norm"], config.rms_norm_eps)
    q = project(h, w, "q_proj", "btd,dnh->btnh") + w["q_bias"]
    k = project(h, w, "k_proj", "btd,dnh->btnh") + w["k_bias"]
    v = project(h, w, "v_proj", "btd,dnh->btnh") + w["v_bias"]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_residual_and_mlp(
    config: Qwen2Config, x: jax.Array, w: dict[str, jax.Array], attended: jax.Array,
) -> jax.Array:
    """Second half of a decoder layer: output projection of attended [B, T, H, hd] and the SwiGLU MLP, each
    added to the residual stream x [B, T, D]."""
    x = x + project(attended, w, "o_proj", "btnh,nhd->btd")
    h = rms_norm(x, w["post_norm"], config.rms_norm_eps)
    gate = project(h, w, "gate_proj", "btd,df->btf")
    up = project(h, w, "up_proj", "btd,df->btf")
    return x + project(jax.nn.silu(gate) * up, w, "down_proj", "btf,fd->btd")


def decoder_layer(
    config: Qwen2Config, x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array,
    segments: CausalSegments, kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm decoder layer. x [B, T, D]; w: this layer's weights; segments: who attends to whom; kv:
    this layer's cache [B, S, KV, hd].

    Returns the new residual stream and the keys/values attended over (the updated cache when kv is given).
    """
    q, k, v = project_qkv(config, x, w, cos, sin)  # [B, T, H, hd], [B, T, KV, hd] x2
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    if kv is not None:
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))  # [B, S, KV, hd]
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
    out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), segments, impl=config.attention_impl)
    x = attention_residual_and_mlp(config, x, w, out)
    return constrain(x, ("batch", "length", "act_embed")), (k, v)


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 causal LM: token embedding, scanned decoder layers, final RMSNorm, tied or untied LM head.

    Implements the `CausalLM` protocol (m2io_jax.models.protocol) for the sampler and the trainer.
    """

    model_type = "qwen2"

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype,
                                  std=c.initializer_range)
        self.layers = DecoderLayers(c, rngs=rngs)
        self.norm = param(rngs, (c.hidden_size,), ("norm",), c.param_dtype, init="ones")
        self.lm_head = None if c.tie_word_embeddings else param(
            rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype, std=c.initializer_range)

    # ----------------------------------------------------------------------------------------------- inputs
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype."""
        table = self.embed_tokens[...].astype(self.config.dtype)
        return constrain(jnp.take(table, input_ids, axis=0), ("batch", "length", "act_embed"))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of `max_length` slots."""
        c = self.config
        shape = (c.num_hidden_layers, batch_size, max_length, c.num_key_value_heads, c.head_dim)
        zeros = jnp.zeros(shape, dtype or c.dtype)
        return KVCache(k=zeros, v=zeros, segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
                       index=jnp.zeros((), jnp.int32))

    # ---------------------------------------------------------------------------------------------- decoder
    def forward(
        self, inputs_embeds: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder over inputs_embeds [B, T, D]; returns final-normed hidden [B, T, D] and the cache."""
        c = self.config
        b, t, _ = inputs_embeds.shape
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids shape {segment_ids.shape} does not match inputs [B, T] = {(b, t)}")
        if positions.shape[-2:] != (b, t):
            raise ValueError(f"positions shape {positions.shape} does not match inputs [B, T] = {(b, t)}")
        segment_ids = segment_ids.astype(jnp.int32)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)
        weights = self.layers.stacked(c.dtype)
        layer = with_remat(functools.partial(decoder_layer, c), c.remat)
        x = inputs_embeds.astype(c.dtype)

        if cache is None:
            segments = CausalSegments(segment_ids, segment_ids, jnp.zeros((), jnp.int32))

            def step(x, w):
                x, _ = layer(x, w, cos, sin, segments, None, None)
                return x, None

            x, _ = jax.lax.scan(step, x, weights)
            new_cache = None
        else:
            index = cache.index
            cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
            segments = CausalSegments(segment_ids, cache_segments, index)

            def step(carry, w_i):
                x, k_all, v_all = carry
                w, i = w_i
                x, (k, v) = layer(x, w, cos, sin, segments, (k_all[i], v_all[i]), index)
                new_k = jax.lax.dynamic_slice_in_dim(k, index, t, axis=1)[None]  # [1, B, T, KV, hd]
                new_v = jax.lax.dynamic_slice_in_dim(v, index, t, axis=1)[None]
                k_all = jax.lax.dynamic_update_slice(k_all, new_k, (i, 0, index, 0, 0))
                v_all = jax.lax.dynamic_update_slice(v_all, new_v, (i, 0, index, 0, 0))
                return (x, k_all, v_all), None

            layer_ids = jnp.arange(c.num_hidden_layers)
            (x, k_all, v_all), _ = jax.lax.scan(step, (x, cache.k, cache.v), (weights, layer_ids))
            new_cache = KVCache(k=k_all, v=v_all, segment_ids=cache_segments, index=index + t)
        return rms_norm(x, self.norm[...], c.rms_norm_eps), new_cache

    # ----------------------------------------------------------------------------------------------- output
    def lm_head_weight(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.config.dtype).T
        return self.lm_head[...].astype(self.config.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full logits [B, T, V] in float32. For training and sampling prefer `token_logprobs`."""
        return jnp.einsum("btd,dv->btv", hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)

    def token_logprobs(
        self, hidden: jax.Array, targets: jax.Array, *, temperature: float = 1.0, chunk_size: int = 128,
        suppress_tokens: Sequence[int] = (),
    ) -> jax.Array:
        """log softmax(logits / temperature)[target] for hidden [B, T, D], targets [B, T] -> [B, T] float32,
        `suppress_tokens` masked before the softmax (`protocol.suppress_logits`).

        Scans over chunks of `chunk_size` positions with rematerialisation, so at most [B, chunk, V] logits
        exist at once in the forward and the backward pass (Qwen's vocabulary is 151,936).
        """
        b, t, d = hidden.shape
        chunk = min(chunk_size, t)
        pad = (-t) % chunk
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        n = (t + pad) // chunk
        hidden_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, chunk, D]
        target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, chunk]
        head = self.lm_head_weight()

        @jax.checkpoint
        def one(h, y):
            logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32) / temperature
            logits = suppress_logits(logits, suppress_tokens)
            picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
            return picked - jax.nn.logsumexp(logits, axis=-1)

        _, out = jax.lax.scan(lambda _, hy: (None, one(*hy)), None, (hidden_chunks, target_chunks))
        return out.swapaxes(0, 1).reshape(b, t + pad)[:, :t]

    # ------------------------------------------------------------------------------ CausalLM protocol: host
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vision_parameters(self) -> str | None:
        return None

    def prepare_prompts(self, prompts: Sequence[Sequence[int]], images: Sequence[Any] | None, *, rows: int,
                        length: int) -> PreparedInputs:
        """Left-padded prompts [rows, length] with RoPE positions (see `CausalLM.prepare_prompts`)."""
        if images is not None:
            given = [i for i, x in enumerate(images) if x is not None]
            where = f"images[{given[0]}]" if given else "images"
            raise ValueError(f"{where} was given but {type(self).__name__} is a text-only model")
        ids, mask = left_pad(prompts, rows, length)
        return PreparedInputs(ids=ids, mask=mask, positions=default_positions(mask),
                              next_position=mask.sum(axis=-1).astype(np.int32))

    def placeholder_prompts(self, batch_size: int, prompt_length: int, image_grid_thw: Any | None,
                            ) -> tuple[list[list[int]], list[Any] | None]:
        if image_grid_thw is not None:
            raise ValueError(f"image_grid_thw was given but {type(self).__name__} is a text-only model")
        return [[1] * prompt_length for _ in range(batch_size)], None

    # ---------------------------------------------------------------------------- CausalLM protocol: device
    def encode_vision(self, inputs: PreparedInputs) -> None:
        """A text model has no vision features."""
        return None

    def prefill(self, inputs: PreparedInputs, vision_features: jax.Array | None = None,
                ) -> tuple[jax.Array, PrefixCache]:
        return self.prefill_embeds(self.embed(inputs.ids), inputs)

    def prefill_embeds(self, embeds: jax.Array, inputs: PreparedInputs) -> tuple[jax.Array, PrefixCache]:
        """`prefill` from prompt embeddings [B, P, D] (a VL model's, image features merged in)."""
        b, p = inputs.ids.shape
        hidden, cache = self.forward(embeds, positions=inputs.positions, segment_ids=inputs.mask,
                                     cache=self.init_cache(b, p))
        logits = jnp.einsum("bd,dv->bv", hidden[:, -1], self.lm_head_weight(), preferred_element_type=jnp.float32)
        return logits, PrefixCache(k=cache.k, v=cache.v, mask=inputs.mask.astype(bool),
                                   next_position=inputs.next_position)

    def init_suffix_cache(self, batch_size: int, num_samples: int, length: int) -> SuffixCache:
        c = self.config
        shape = (c.num_hidden_layers, batch_size, num_samples, length, c.num_key_value_heads, c.head_dim)
        zeros = constrain(jnp.zeros(shape, c.dtype), ("layers", "batch", None, "cache_length", "act_kv_heads", None))
        return SuffixCache(k=zeros, v=zeros)

    def _suffix_rope(self, next_position: jax.Array, offsets: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
        """Rotary tables [B * rows, T, hd] of tokens `offsets` [T] after each prompt (text: 3 equal M-RoPE axes)."""
        c = self.config
        b = next_position.shape[0]
        positions = next_position[:, None, None] + offsets[None, None, :]  # [B, 1, T]
        positions = jnp.broadcast_to(positions, (b, rows, offsets.shape[0])).reshape(b * rows, -1)
        if c.mrope_section is not None:
            positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        return rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)

    def decode_step(self, tokens: jax.Array, prefix: PrefixCache, suffix: SuffixCache, slot: jax.Array, *,
                    span: int) -> tuple[jax.Array, SuffixCache]:
        """One token per row: tokens [B, G] -> logits [B, G, V] float32 (see `CausalLM.decode_step`)."""
        c = self.config
        b, g = tokens.shape
        m = b * g
        cos, sin = self._suffix_rope(prefix.next_position, slot[None], g)  # [M, 1, hd]
        x = self.embed(tokens.reshape(m, 1))  # [M, 1, D]

        def layer(carry, xs):
            x, k_all, v_all = carry
            w, i = xs
            q, k, v = project_qkv(c, x, w, cos, sin)  # [M, 1, H, hd], [M, 1, KV, hd] x2
            new_k = k.reshape(1, b, g, 1, *k.shape[2:]).astype(k_all.dtype)
            new_v = v.reshape(1, b, g, 1, *v.shape[2:]).astype(v_all.dtype)
            k_all = jax.lax.dynamic_update_slice(k_all, new_k, (i, 0, 0, slot, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, new_v, (i, 0, 0, slot, 0, 0))
            q = constrain(q.reshape(b, g, *q.shape[2:]), ("batch", None, "act_heads", None))
            out = shared_prefix_decode(q, prefix.k, prefix.v, prefix.mask, k_all, v_all, i, slot, span=span,
                                       impl=c.attention_impl)  # [B, G, H, hd]
            x = attention_residual_and_mlp(c, x, w, out.reshape(m, 1, *out.shape[2:]))
            return (constrain(x, ("batch", "length", "act_embed")), k_all, v_all), None

        layer_ids = jnp.arange(c.num_hidden_layers)
        (x, k_all, v_all), _ = jax.lax.scan(
            layer, (x, suffix.k, suffix.v), (self.layers.stacked(c.dtype), layer_ids))
        hidden = rms_norm(x[:, 0], self.norm[...], c.rms_norm_eps)  # [M, D]
        logits = jnp.einsum("md,dv->mv", hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)
        return logits.reshape(b, g, -1), SuffixCache(k=k_all, v=v_all)

    def completion_logprobs(self, inputs: PreparedInputs, completions: jax.Array,
                            vision_features: jax.Array | None = None, *, temperature: float = 1.0,
                            suppress_tokens: Sequence[int] = ()) -> jax.Array:
        return self.completion_logprobs_embeds(self.embed(inputs.ids), inputs, completions, temperature=temperature,
                                               suppress_tokens=suppress_tokens)

    def completion_logprobs_embeds(self, embeds: jax.Array, inputs: PreparedInputs, completions: jax.Array, *,
                                   temperature: float = 1.0, suppress_tokens: Sequence[int] = ()) -> jax.Array:
        """`completion_logprobs` from prompt embeddings [B, P, D]: completions [B, G, N] -> [B, G, N] float32.

        The prompt runs once (its last position predicts each completion's first token); the B * G completion
        rows then run through every layer attending to their prompt's keys and values and, causally, to their
        own, so a completion costs N rows instead of P + N.
        """
        c = self.config
        b, g, n = completions.shape
        first_logits, prefix = self.prefill_embeds(embeds, inputs)  # [B, V]
        first = jax.nn.log_softmax(suppress_logits(first_logits / temperature, suppress_tokens), axis=-1)
        first = jnp.take_along_axis(first[:, None, :], completions[:, :, :1], axis=-1)[..., 0]  # [B, G]
        if n == 1:
            return first[..., None]
        cos, sin = self._suffix_rope(prefix.next_position, jnp.arange(n), g)  # [M, N, hd]
        x = self.embed(completions.reshape(b * g, n))  # [M, N, D]

        def layer(x, xs):
            w, pk, pv = xs
            q, k, v = project_qkv(c, x, w, cos, sin)  # [M, N, H, hd], [M, N, KV, hd] x2
            q = constrain(q.reshape(b, g, n, *q.shape[2:]), ("batch", None, "length", "act_heads", None))
            k, v = (a.reshape(b, g, n, *a.shape[2:]) for a in (k, v))
            out = shared_prefix_attention(q, pk.astype(q.dtype), pv.astype(q.dtype), prefix.mask, k, v,
                                          impl=c.attention_impl)  # [B, G, N, H, hd]
            x = attention_residual_and_mlp(c, x, w, out.reshape(b * g, n, *out.shape[3:]))
            return constrain(x, ("batch", "length", "act_embed")), None

        x, _ = jax.lax.scan(with_remat(layer, c.remat), x, (self.layers.stacked(c.dtype), prefix.k, prefix.v))
        hidden = rms_norm(x, self.norm[...], c.rms_norm_eps)  # [M, N, D]
        targets = completions.reshape(b * g, n)
        rest = self.token_logprobs(hidden[:, :-1], targets[:, 1:], temperature=temperature,
                                   suppress_tokens=suppress_tokens)  # [M, N - 1]
        return jnp.concatenate([first[..., None], rest.reshape(b, g, n - 1)], axis=-1)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] for input_ids [B, T]. With left padding, pass attention_mask (1 = token, 0 = pad);
        positions then default to cumsum(mask) - 1 (what Hugging Face generate uses)."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {input_ids.shape}")
        mask = jnp.ones_like(input_ids, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {input_ids.shape}")
        if positions is None:
            positions = default_positions(mask)
        hidden, _ = self.forward(self.embed(input_ids), positions=positions, segment_ids=mask)
        return self.logits(hidden)


def default_positions(attention_mask: Any) -> Any:
    """Positions [B, T] for left- or right-padded rows: cumsum(mask) - 1, clamped at 0 on padding.

    numpy in, numpy out (host-side prompt preparation); otherwise a jax array.
    """
    xp = np if isinstance(attention_mask, np.ndarray) else jnp
    return xp.maximum(xp.cumsum(attention_mask, axis=-1) - 1, 0).astype(xp.int32)
