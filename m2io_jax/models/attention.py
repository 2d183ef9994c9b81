"""Attention of the Qwen2 decoder, behind the `attention_impl` switch of its config.

Three layouts:
- `grouped_attention`: every row attends to its own keys, causally inside its segments (`CausalSegments`):
  prefill and the training forward;
- `shared_prefix_attention`: G rows of one prompt attend to that prompt's keys, held once, and causally to
  their own keys (GRPO's log-prob pass over G completions of one prompt);
- `shared_prefix_decode`: the sampler's decode step, one token per row against the prompt's keys and the row's
  suffix cache.

All keep K/V heads shared by H // KV query heads without repeating them, and compute scores and softmax in
float32. `ATTENTION_IMPLS` lists the implementations:
- "xla": plain einsums compiled by XLA (the reference; any backend);
- "pallas": Pallas TPU kernels (`m2io_jax.models.kernels`): splash attention with segment ids for the first two
  (and the vision tower's windows), and a decode kernel that reads each prompt's keys once for its G samples.
  Off TPU they run in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m2io_jax.models.kernels import decode, splash
from m2io_jax.models.layers import MASKED_SCORE

ATTENTION_IMPLS = ("xla", "pallas")


def check_attention_impl(name: str, where: str) -> None:
    """Raises naming `where` and the valid implementations when `name` is not one of `ATTENTION_IMPLS`."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention_impl={name!r}; expected one of {', '.join(ATTENTION_IMPLS)}")


def causal_segment_mask(q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array) -> jax.Array:
    """Boolean mask [B, T, S]: key slot j is visible to query i iff j <= slot(i), same segment, not padding."""
    causal = jnp.arange(k_segments.shape[1])[None, None, :] <= q_slots[None, :, None]  # [1, T, S]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return causal & same & (k_segments[:, None, :] != 0)


@struct.dataclass
class CausalSegments:
    """Who sees whom in the decoder: query i (at key slot q_offset + i) sees key slots up to its own, in its
    own segment, never segment 0 (padding or an empty cache slot)."""

    q_segments: jax.Array  # [B, T] int32
    k_segments: jax.Array  # [B, S] int32
    q_offset: jax.Array  # [] int32: the key slot of the first query

    def mask(self) -> jax.Array:
        """The dense boolean mask [B, T, S]."""
        q_slots = self.q_offset + jnp.arange(self.q_segments.shape[1])
        return causal_segment_mask(self.q_segments, self.k_segments, q_slots)


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: CausalSegments, *, impl: str = "xla",
) -> jax.Array:
    """Grouped-query causal attention. q [B, T, H, hd], k/v [B, S, KV, hd] -> [B, T, H, hd].

    "pallas" runs whole sequences (T == S: training, prefill into an empty cache, whose keys are the queries'
    own); one-token decoding goes through `shared_prefix_decode`.
    """
    check_attention_impl(impl, "grouped_attention")
    b, t, h, hd = q.shape
    if impl == "pallas":
        if k.shape[1] != t:
            raise ValueError(f"grouped_attention(impl='pallas'): {t} queries against {k.shape[1]} keys; the splash "
                             f"path attends whole sequences (queries == keys), decode through shared_prefix_decode")
        return splash.causal_attention(q, k, v, segments.k_segments)
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(segments.mask()[:, None, None, :, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def _shared_prefix_xla(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, suffix_mask: jax.Array,
) -> jax.Array:
    """The einsum reference of both shared-prefix layouts; suffix_mask [T, S] says which own keys each query
    sees. One softmax over the prefix and suffix scores; the prefix is one batched product for the G rows."""
    b, g, t, h, hd = q.shape
    kv = prefix_k.shape[2]
    q = q.reshape(b, g, t, kv, h // kv, hd)
    scale = hd ** -0.5
    s_pre = jnp.einsum("bgtkqd,bpkd->bkgqtp", q, prefix_k, preferred_element_type=jnp.float32) * scale
    s_suf = jnp.einsum("bgtkqd,bgskd->bkgqts", q, suffix_k, preferred_element_type=jnp.float32) * scale
    s_pre = jnp.where(prefix_mask[:, None, None, None, None, :], s_pre, MASKED_SCORE)
    s_suf = jnp.where(suffix_mask, s_suf, MASKED_SCORE)
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_suf], axis=-1), axis=-1).astype(prefix_v.dtype)
    p = prefix_k.shape[1]
    out = (jnp.einsum("bkgqtp,bpkd->bgtkqd", probs[..., :p], prefix_v)
           + jnp.einsum("bkgqts,bgskd->bgtkqd", probs[..., p:], suffix_v))
    return out.reshape(b, g, t, h, hd)


def shared_prefix_attention(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, *, impl: str = "xla",
) -> jax.Array:
    """Attention of G rows per prompt to the prompt's shared keys and, causally, to each row's own keys.

    q [B, G, N, H, hd]; prefix_k/v [B, P, KV, hd], prefix_mask [B, P] bool (False on padding); suffix_k/v
    [B, G, N, KV, hd] (the rows' own tokens, query i sees own keys 0..i) -> [B, G, N, H, hd]. Exactly attention
    over prompt + own tokens; the prefix is read once per prompt, not once per row.
    """
    check_attention_impl(impl, "shared_prefix_attention")
    if impl == "pallas":
        return splash.shared_prefix_attention(q, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v)
    n = q.shape[2]
    causal = jnp.tril(jnp.ones((n, n), bool))
    return _shared_prefix_xla(q, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v, causal)


def shared_prefix_decode(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, layer: jax.Array, slot: jax.Array, *, span: int, impl: str = "xla",
) -> jax.Array:
    """One decode step's attention in layer `layer`: each row's token against its prompt and its suffix.

    q [B, G, H, hd]; prefix_k/v [L, B, P, KV, hd] (every layer's: the kernel reads layer `layer` in place),
    prefix_mask [B, P] bool; suffix_k/v [L, B, G, S, KV, hd] with this step's keys already written at `slot`;
    layer, slot: int32 scalars; span: static, the suffix slots read (those <= slot are visible) -> [B, G, H, hd].
    """
    check_attention_impl(impl, "shared_prefix_decode")
    if impl == "pallas":
        return decode.shared_prefix_decode(q, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v, layer, slot,
                                           span=span)

    def at_layer(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(a, layer, axis=0, keepdims=False).astype(q.dtype)

    visible = (jnp.arange(span) <= slot)[None]  # [1, span]
    out = _shared_prefix_xla(q[:, :, None], at_layer(prefix_k), at_layer(prefix_v), prefix_mask,
                             at_layer(suffix_k)[:, :, :span], at_layer(suffix_v)[:, :, :span], visible)
    return out[:, :, 0]
