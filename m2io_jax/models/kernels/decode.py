"""The sampler's decode attention: one new token for each of G samples per prompt, the prompt's keys read once.

In a decode step every sample of a prompt attends to the same prompt keys and values (the shared prefix) and
to its own generated tokens (its suffix). This Pallas kernel runs one grid cell per (prompt, key/value head)
and walks the key axis in blocks: first the prefix, each block loaded once and multiplied against all G * Hg
query rows of that prompt (G samples x the query heads of the key/value head) in one matmul, then the suffix
blocks of each sample, which only that sample's rows see. An online softmax (running max, denominator and
accumulator in float32 VMEM scratch) joins the blocks, so the result is exactly one softmax over prompt and own
tokens, as `m2io_jax.models.attention.shared_prefix_decode` computes it with einsums.

The caches are read in place: the whole stacked cache `[L, ...]` is the operand and the layer and decode slot
are scalar-prefetched, so no per-layer slice or transpose of the cache is materialised; a key/value head is
a lane-block of the `[..., KV * hd]` view (free reshape), so on TPU hd must be a multiple of 128 (every Qwen2.5
size) or KV must be 1. Only the small query and output are transposed. Not differentiable (sampling only; the
log-prob pass uses splash, `kernels.splash.shared_prefix_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from m2io_jax.models.kernels.placement import interpret_mode, per_shard
from m2io_jax.models.layers import MASKED_SCORE


def key_block(length: int, limit: int = 512) -> int:
    """The key-axis tile: the largest divisor of `length` up to `limit` that is a multiple of 8, else `length`."""
    fits = [d for d in range(8, min(limit, length) + 1, 8) if length % d == 0]
    return max(fits) if fits else length


def _decode_kernel(scalars, q_ref, row_sample_ref, pk_ref, pv_ref, pmask_ref, sk_ref, sv_ref, o_ref,
                   m_ref, l_ref, acc_ref, *, prefix_blocks: int, suffix_blocks: int, prefix_block: int,
                   suffix_block: int, scale: float):
    """One (prompt, key/value head) cell, key block j: prefix blocks first, then each sample's suffix blocks.

    q_ref [R, hd] with R = G * Hg rows in (sample, head) order; row_sample_ref [R, 1] (each row's sample);
    pk/pv_ref [bp, hd], pmask_ref [1, bp]; sk/sv_ref [bs, hd] of one sample; o_ref [R, hd].
    """
    j = pl.program_id(2)
    slot = scalars[1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED_SCORE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(k: jax.Array, v: jax.Array, visible: jax.Array) -> None:
        scores = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale  # [R, block]
        scores = jnp.where(visible, scores, MASKED_SCORE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))  # [R, 1]
        probs = jnp.where(visible, jnp.exp(scores - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(probs, axis=-1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j < prefix_blocks)
    def _prefix():
        visible = jnp.broadcast_to(pmask_ref[...] != 0, (q_ref.shape[0], prefix_block))
        accumulate(pk_ref[...], pv_ref[...], visible)

    @pl.when(j >= prefix_blocks)
    def _suffix():
        t = j - prefix_blocks
        sample, block = t // suffix_blocks, t % suffix_blocks
        slots = block * suffix_block + jax.lax.broadcasted_iota(jnp.int32, (1, suffix_block), 1)
        visible = (row_sample_ref[...] == sample) & (slots <= slot)  # [R, bs]
        accumulate(sk_ref[...], sv_ref[...], visible)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)


def _decode_call(scalars: jax.Array, q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array,
                 suffix_k: jax.Array, suffix_v: jax.Array, *, span: int, block: int, interpret: bool) -> jax.Array:
    """The pallas_call on one shard: q [B, G, KV, Hg, hd]; prefix_k/v [L, B, P, KV, hd]; prefix_mask [B, P];
    suffix_k/v [L, B, G, S, KV, hd]; scalars [2] int32 (layer, slot) -> [B, G, KV, Hg, hd]."""
    b, g, kv, hg, hd = q.shape
    p = prefix_k.shape[2]
    s = suffix_k.shape[3]
    rows = g * hg
    bp, bs = key_block(p, block), key_block(span, block)
    prefix_blocks, suffix_blocks = p // bp, span // bs
    suffix_per_sample = s // bs if s % bs == 0 else None
    if suffix_per_sample is None:
        raise ValueError(f"shared_prefix_decode: suffix cache length {s} is not a multiple of the key block {bs} "
                         f"of span {span}")
    q_rows = jnp.moveaxis(q, 2, 1).reshape(b, kv, rows, hd)  # [B, KV, R, hd]
    pk, pv = (a.reshape(*a.shape[:3], kv * hd) for a in (prefix_k, prefix_v))  # [L, B, P, KV*hd]
    sk, sv = (a.reshape(a.shape[0], b, g * s, kv * hd) for a in (suffix_k, suffix_v))  # [L, B, G*S, KV*hd]
    pmask = prefix_mask.astype(jnp.int32).reshape(b, 1, p)
    row_sample = jnp.asarray(np.repeat(np.arange(g, dtype=np.int32), hg)[:, None])  # [R, 1]

    def prefix_index(bi, ki, j, sc):
        return sc[0], bi, jnp.minimum(j, prefix_blocks - 1), ki

    def suffix_index(bi, ki, j, sc):
        t = jnp.maximum(j - prefix_blocks, 0)
        return sc[0], bi, (t // suffix_blocks) * suffix_per_sample + t % suffix_blocks, ki

    kernel = functools.partial(_decode_kernel, prefix_blocks=prefix_blocks, suffix_blocks=suffix_blocks,
                               prefix_block=bp, suffix_block=bs, scale=hd**-0.5)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kv, prefix_blocks + g * suffix_blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, hd), lambda bi, ki, j, sc: (bi, ki, 0, 0)),
            pl.BlockSpec((rows, 1), lambda bi, ki, j, sc: (0, 0)),
            pl.BlockSpec((None, None, bp, hd), prefix_index),
            pl.BlockSpec((None, None, bp, hd), prefix_index),
            pl.BlockSpec((None, 1, bp), lambda bi, ki, j, sc: (bi, 0, jnp.minimum(j, prefix_blocks - 1))),
            pl.BlockSpec((None, None, bs, hd), suffix_index),
            pl.BlockSpec((None, None, bs, hd), suffix_index),
        ],
        out_specs=pl.BlockSpec((None, None, rows, hd), lambda bi, ki, j, sc: (bi, ki, 0, 0)),
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, hd), jnp.float32)],
    )
    keys = p + g * span  # every row meets every key tile it loads (other samples' suffix keys are masked)
    itemsize = jnp.dtype(prefix_k.dtype).itemsize
    cost = pl.CostEstimate(flops=4 * b * kv * rows * keys * hd, transcendentals=b * kv * rows * keys,
                           bytes_accessed=2 * b * kv * keys * hd * itemsize + 2 * q_rows.size * q.dtype.itemsize)
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, kv, rows, hd), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="shared_prefix_decode", cost_estimate=cost,
    )(scalars, q_rows, row_sample, pk, pv, pmask, sk, sv)
    return jnp.moveaxis(out.reshape(b, kv, g, hg, hd), 1, 2)


def shared_prefix_decode(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, layer: jax.Array, slot: jax.Array, *, span: int, block: int = 512,
) -> jax.Array:
    """Decode attention of layer `layer` for one token per sample.

    q [B, G, H, hd] (unscaled); prefix_k/v [L, B, P, KV, hd] (all layers), prefix_mask [B, P] bool; suffix_k/v
    [L, B, G, S, KV, hd] (all layers); layer, slot: int32 scalars; span: static, the suffix slots read (slots
    <= slot are visible); block: the largest key tile (`key_block`) -> [B, G, H, hd].
    """
    b, g, h, hd = q.shape
    kv = prefix_k.shape[3]
    grouped = q.reshape(b, g, kv, h // kv, hd)  # key/value heads on their own axis: sharded like the caches'
    scalars = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(slot, jnp.int32)])
    call = functools.partial(_decode_call, span=span, block=block, interpret=interpret_mode())
    rows, heads = "batch", "act_kv_heads"
    out = per_shard(
        call, (scalars, grouped, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v),
        in_axes=((None,), (rows, None, heads, None, None), (None, rows, None, heads, None),
                 (None, rows, None, heads, None), (rows, None), (None, rows, None, None, heads, None),
                 (None, rows, None, None, heads, None)),
        out_axes=(rows, None, heads, None, None), out_shape=grouped.shape)
    return out.reshape(b, g, h, hd)
