"""Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) for the model's differentiable passes.

Splash is block-sparse flash attention: a static mask says which (query block, key block) tiles are computed
at all, and segment ids (a query sees a key only when their ids are equal) handle what varies per row: left
padding, padded vision patches, a prompt's padding. Its forward and backward are Pallas kernels; on CPU they
run in Pallas interpret mode (`placement.interpret_mode`), which is how the tests check them against XLA.

Layout: the kernel is splash's multi-query form (one key/value head, `Hg` query heads), vmapped over rows and
key/value heads, so grouped-query attention never repeats keys. Sequence lengths are padded to multiples of
128 (the kernel's lane width) with segment id 0; a padding query sees only padding keys (never an empty row),
and real queries never see segment 0. Query scaling by head_dim**-0.5 is the caller's (splash does not scale).

Three masks:
- `causal_attention`: the decoder, causal over the sequence, segment ids = the row's segment ids (0 on left
  padding, so real tokens never see it);
- `bidirectional_attention`: the vision tower's windows and full-attention rows, all keys of a row, segment
  ids = patch validity;
- `shared_prefix_attention`: G completions per prompt, each seeing the prompt (segment ids drop its padding)
  and, causally, its own tokens; a static mask over [G * N queries, P + G * N keys] (`SharedPrefixMask`) makes
  the kernel skip the tiles where a completion would meet another one's keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from m2io_jax.models.kernels.placement import interpret_mode, per_shard

LANES = 128  # splash's key block must be a multiple of this; sequences are padded to it


class SharedPrefixMask(splash.Mask):
    """Static splash mask [queries, keys] of G completions of N tokens against their prompt and themselves.

    Keys are the prompt's P slots, then the G completions' N slots each, then padding; queries are the G
    completions' N slots each, then padding. A completion query sees every prompt key and its own completion's
    keys up to itself; padding queries see every prompt and completion key (they only need a non-empty row).
    """

    def __init__(self, shape: tuple[int, int], prefix: int, samples: int, length: int):
        if shape[0] < samples * length or shape[1] < prefix + samples * length:
            raise ValueError(f"SharedPrefixMask: shape {shape} cannot hold {samples} completions of {length} tokens "
                             f"after a prompt of {prefix}")
        self._shape = shape
        self.prefix, self.samples, self.length = prefix, samples, length

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def __getitem__(self, idx: tuple[slice, slice]) -> np.ndarray:
        rows_slice, cols_slice = idx
        rows = np.arange(self._shape[0])[rows_slice][:, None]
        cols = np.arange(self._shape[1])[cols_slice][None, :]
        real_keys = self.prefix + self.samples * self.length
        own = cols - self.prefix  # slot among the completions' keys
        same_completion = (own // self.length == rows // self.length) & (own % self.length <= rows % self.length)
        padding_query = rows >= self.samples * self.length
        suffix_visible = (own >= 0) & (cols < real_keys) & (same_completion | padding_query)
        return (cols < self.prefix) | suffix_visible

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SharedPrefixMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, ...]:
        return (*self._shape, self.prefix, self.samples, self.length)


def padded(length: int) -> int:
    """`length` rounded up to a multiple of `LANES`."""
    return -(-length // LANES) * LANES


def _block(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (a multiple of 128): the tile along that axis."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def _kernel(mask: splash.Mask, query_heads: int, interpret: bool) -> splash.SplashAttentionKernel:
    """A multi-query splash kernel for one 2-D `mask` repeated over `query_heads` heads (splash caches the
    mask's block analysis per mask, so a trace rebuilds only the small kernel object)."""
    q_len, k_len = mask.shape
    bq, bk = _block(q_len), _block(k_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    heads = splash.MultiHeadMask([mask] * query_heads)
    return splash.make_splash_mqa_single_device(heads, block_sizes=sizes, interpret=interpret)


def _pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _grouped_splash(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array, k_segments: jax.Array, mask: splash.Mask,
    heads_axis: str,
) -> jax.Array:
    """Splash over rows and key/value heads: q [B, KV, Hg, Tq, hd], k/v [B, KV, Tk, hd], q_segments [B, Tq],
    k_segments [B, Tk] int32 -> [B, KV, Hg, Tq, hd]. Tq, Tk are padded to `mask.shape` here (segment id 0)."""
    q_len, k_len = mask.shape
    tq = q.shape[3]
    q = _pad_axis(q, 3, q_len)
    k, v = (_pad_axis(a, 2, k_len) for a in (k, v))
    q_segments = _pad_axis(q_segments.astype(jnp.int32), 1, q_len)
    k_segments = _pad_axis(k_segments.astype(jnp.int32), 1, k_len)
    kernel = _kernel(mask, q.shape[2], interpret_mode())

    def local(q, k, v, q_segments, k_segments):
        def one_head(q, k, v, ids):
            return kernel(q, k, v, segment_ids=ids)

        def one_row(q, k, v, qs, ks):
            return jax.vmap(one_head, in_axes=(0, 0, 0, None))(q, k, v, splash.SegmentIds(q=qs, kv=ks))

        return jax.vmap(one_row)(q, k, v, q_segments, k_segments)

    rows, heads = ("batch", heads_axis)
    out = per_shard(local, (q, k, v, q_segments, k_segments),
                    in_axes=((rows, heads, None, None, None), (rows, heads, None, None), (rows, heads, None, None),
                             (rows, None), (rows, None)),
                    out_axes=(rows, heads, None, None, None), out_shape=q.shape)
    return out[:, :, :, :tq]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Causal grouped-query attention inside segments: q [B, T, H, hd] (unscaled), k/v [B, T, KV, hd],
    segment_ids [B, T] (0 = padding, never seen by a real token) -> [B, T, H, hd]."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    scaled = (q.astype(jnp.float32) * hd**-0.5).astype(q.dtype)
    q5 = jnp.moveaxis(scaled.reshape(b, t, kv, h // kv, hd), 1, 3)  # [B, KV, Hg, T, hd]
    k4, v4 = (jnp.moveaxis(a, 1, 2) for a in (k, v))  # [B, KV, T, hd]
    length = padded(t)
    out = _grouped_splash(q5, k4, v4, segment_ids, segment_ids, splash.CausalMask((length, length)),
                          "act_kv_heads")
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, hd)


def bidirectional_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Attention over all valid keys of each row, heads-major: q [N, H, L, hd] (already scaled), k/v
    [N, H, L, hd], key_valid [N, L] bool -> [N, H, L, hd]. Rows of the same positions for queries and keys
    (vision windows, full-attention image rows), so validity is both sides' segment id."""
    length = padded(q.shape[2])
    segments = key_valid.astype(jnp.int32)
    out = _grouped_splash(q[:, :, None], k, v, segments, segments, splash.FullMask((length, length)), "act_heads")
    return out[:, :, 0]


def shared_prefix_attention(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array,
) -> jax.Array:
    """G completions per prompt attending to the prompt and causally to themselves, in one splash call.

    q [B, G, N, H, hd] (unscaled); prefix_k/v [B, P, KV, hd], prefix_mask [B, P] bool; suffix_k/v
    [B, G, N, KV, hd] -> [B, G, N, H, hd]. Per prompt the keys are [prompt; completion 1; ...; completion G]
    (the prompt held once) and `SharedPrefixMask` keeps each completion to the prompt and its own keys.
    """
    b, g, n, h, hd = q.shape
    p, kv = prefix_k.shape[1], prefix_k.shape[2]
    scaled = (q.astype(jnp.float32) * hd**-0.5).astype(q.dtype)
    q5 = jnp.moveaxis(scaled.reshape(b, g * n, kv, h // kv, hd), 1, 3)  # [B, KV, Hg, G*N, hd]

    def keys(prefix: jax.Array, suffix: jax.Array) -> jax.Array:
        joined = jnp.concatenate([prefix, suffix.reshape(b, g * n, kv, hd).astype(prefix.dtype)], axis=1)
        return jnp.moveaxis(joined, 1, 2)  # [B, KV, P + G*N, hd]

    k_segments = jnp.concatenate([prefix_mask.astype(jnp.int32), jnp.ones((b, g * n), jnp.int32)], axis=1)
    q_length = padded(g * n)
    mask = SharedPrefixMask((q_length, padded(p + g * n)), p, g, n)
    out = _grouped_splash(q5, keys(prefix_k, suffix_k), keys(prefix_v, suffix_v),
                          jnp.ones((b, q_length), jnp.int32), k_segments, mask, "act_kv_heads")
    return jnp.moveaxis(out, 3, 1).reshape(b, g, n, h, hd)
