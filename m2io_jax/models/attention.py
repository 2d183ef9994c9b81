"""Attention of the Qwen2 decoder, behind the `attention_impl` switch of its config.

Two layouts:
- `grouped_attention`: every row attends to its own keys (prefill, training forward), with a boolean mask;
- `shared_prefix_attention`: G rows of one prompt attend to that prompt's keys, held once, and to their own
  keys (sampling after a shared prefill, GRPO's log-prob pass over G completions of one prompt).

Both keep K/V heads shared by H // KV query heads without repeating them, and compute scores and softmax in
float32. `ATTENTION_IMPLS` lists the implementations; "xla" (plain einsums, compiled by XLA) is the only one
today, and Pallas kernels are added here under their own names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m2io_jax.models.layers import MASKED_SCORE

ATTENTION_IMPLS = ("xla",)


def check_attention_impl(name: str, where: str) -> None:
    """Raises naming `where` and the valid implementations when `name` is not one of `ATTENTION_IMPLS`."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention_impl={name!r}; expected one of {', '.join(ATTENTION_IMPLS)}")


def causal_segment_mask(q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array) -> jax.Array:
    """Boolean mask [B, T, S]: key slot j is visible to query i iff j <= slot(i), same segment, not padding."""
    causal = jnp.arange(k_segments.shape[1])[None, None, :] <= q_slots[None, :, None]  # [1, T, S]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return causal & same & (k_segments[:, None, :] != 0)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "xla") -> jax.Array:
    """Grouped-query attention. q [B, T, H, hd], k/v [B, S, KV, hd], mask [B, T, S] -> [B, T, H, hd]."""
    check_attention_impl(impl, "grouped_attention")
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def shared_prefix_attention(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, suffix_mask: jax.Array, *, impl: str = "xla",
) -> jax.Array:
    """Attention of G rows per prompt to the prompt's shared keys and to each row's own keys.

    q [B, G, T, H, hd]; prefix_k/v [B, P, KV, hd], prefix_mask [B, P] bool (False on padding);
    suffix_k/v [B, G, S, KV, hd], suffix_mask [T, S] bool (which own keys each query sees: causal over the
    completion, or the slots written so far when decoding) -> [B, G, T, H, hd]. One softmax over the prefix and
    suffix scores, so the result is exactly attention over prompt + own tokens; the prefix is read once per
    prompt (one batched product for the G rows), not once per row.
    """
    check_attention_impl(impl, "shared_prefix_attention")
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
