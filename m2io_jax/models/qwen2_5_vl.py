"""Qwen2.5-VL in flax.nnx: vision tower, M-RoPE positions, multimodal merge and the VL model.

The vision tower (Conv3d patch embedding, 2-D rotary, window attention with a few full-attention blocks,
SwiGLU MLPs, 2x2 patch merger) runs on static, bucketed shapes. The host turns any list of images
(`pixel_values`, `image_grid_thw` exactly as `Qwen2VLImageProcessor` returns them) into a `VisionInputs`
whose canonical layout is **padded windows** `[num_windows, window_len]`:

- window blocks attend inside each row (never a `[total_patches]^2` mask);
- full-attention blocks gather the windows of each image into `[num_images, windows_per_image * window_len]`
  rows (attention does not depend on the order of keys, so no patch-level reorder is needed), attend in
  bounded query blocks, and gather the windows back;
- the merger works on whole 2x2 merge units, which never straddle a window row;
- one last gather puts the merged tokens in Hugging Face order (image after image, raster order).

Every index map is computed on the host (numpy); shapes depend only on the bucket sizes, so a new image size
does not recompile inside a bucket and no Python loop over images runs under jit.

The language half is `Qwen2ForCausalLM` (m2io_jax.models.qwen2) driven with 3-D (temporal, height, width)
positions; `mrope_positions` reproduces transformers' `get_rope_index` for images and returns the
`rope_deltas` that decoding after the prompt adds to the count of real tokens seen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2io_jax.buckets import bucket_size
from m2io_jax.models.qwen2 import (
    REMAT_POLICIES, Qwen2Config, Qwen2ForCausalLM, StackedLayers, apply_rope, rms_norm, with_remat,
)
from m2io_jax.sharding import constrain


_MASKED = -1e30  # additive score bias of padding keys (finite: all-padding rows stay NaN-free)


# ----------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class VisionBuckets:
    """Static sizes a batch of images is padded to; one compilation per combination in use.

    `windows` counts the attention windows of the whole batch, `images` the images (frames), `image_windows`
    the windows of one image (the row length of the full-attention blocks is `image_windows * window_len`).
    Empty tuples mean the next power of two for `images`, and the next of 2**k and 3 * 2**k for the window
    counts (their padding costs FLOPs in every block, quadratically in the full-attention ones).
    `max_image_patches` is the pixel budget per image in patches (`max_pixels / patch_size**2`); an image over
    it is refused with an error that names it.
    """

    windows: tuple[int, ...] = ()
    images: tuple[int, ...] = ()
    image_windows: tuple[int, ...] = ()
    max_image_patches: int = 16384


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of the Qwen2.5-VL vision tower (Hugging Face `vision_config`)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Not in the checkpoint: the most attention scores (images x heads x query rows x image length) one step
    # of a full-attention block holds. The query rows are split into as many steps as needed, so memory and
    # cache traffic stay bounded for any number and size of images (16 images of 1024 patches and 4 heads
    # would otherwise hold 268 MB of scores at once). Raise it on accelerators with memory to spare.
    full_attention_block_scores: int = 1 << 22
    remat: str = "none"  # one of m2io_jax.models.qwen2.REMAT_POLICIES: what the backward pass recomputes per block

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision_config: head_dim {self.hidden_size // self.num_heads} must be a multiple of 4 "
                             f"(2-D rotary)")
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(
                f"vision_config: window_size {self.window_size} is not a multiple of "
                f"spatial_merge_size * patch_size = {self.spatial_merge_size * self.patch_size}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"vision remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.full_attention_block_scores < 1:
            raise ValueError(f"full_attention_block_scores must be positive, got {self.full_attention_block_scores}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config: fullatt_block_indexes {bad} outside [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values` (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merge units per window side."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_len(self) -> int:
        """Patches in one full window (the row length of the window layout)."""
        return self.window_units**2 * self.merge_unit

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = None) -> VisionConfig:
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"vision_config.hidden_act {d['hidden_act']!r}: only 'silu' is supported")
        return cls(
            depth=int(d["depth"]), hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_heads=int(d["num_heads"]), out_hidden_size=int(d["out_hidden_size"]),
            fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(d.get("in_channels", d.get("in_chans", 3))), patch_size=int(d.get("patch_size", 14)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)), window_size=int(d.get("window_size", 112)),
            tokens_per_second=int(d.get("tokens_per_second", 2)),
            dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_5_vl_vision", "depth": self.depth, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
            "out_hidden_size": self.out_hidden_size, "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "in_channels": self.in_channels, "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size, "spatial_merge_size": self.spatial_merge_size,
            "window_size": self.window_size, "tokens_per_second": self.tokens_per_second, "hidden_act": "silu",
        }


# ----------------------------------------------------------------------------------- host-side planning


class VisionInputs(NamedTuple):
    """A batch of images in the padded window layout (numpy on the host, jax arrays under jit).

    Shapes: W windows, L = window_len, I image (frame) rows, V windows per image row, F = W * L / merge_unit.
    """

    patches: Any  # [W, L, patch_dim] float, pixel rows in window order, zeros in padding slots
    patch_hw: Any  # [W, L, 2] int32 (row, col) of each patch in its image, for the 2-D rotary
    window_valid: Any  # [W, L] bool
    image_windows: Any  # [I, V] int32: the windows of each image (frame) in order, 0 in padding slots
    image_valid: Any  # [I, V * L] bool: the real patches of each image row
    window_slot: Any  # [W] int32: slot i * V + v of each window in image_windows (0 for padding windows)
    feature_gather: Any  # [F] int32 index into the flat [W * L / merge_unit] merged tokens, HF order


def _grids(image_grid_thw: Any) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw: expected shape [num_images, 3], got {grid.shape}")
    return grid


def num_image_tokens(image_grid_thw: Any, spatial_merge_size: int) -> np.ndarray:
    """Number of `<|image_pad|>` tokens (merged vision features) of each image: t * h * w / merge**2."""
    grid = _grids(image_grid_thw)
    return (grid.prod(axis=1) // spatial_merge_size**2).astype(np.int64)


def plan_vision_inputs(pixel_values: Any, image_grid_thw: Any, config: VisionConfig,
                       buckets: VisionBuckets = VisionBuckets()) -> VisionInputs:
    """Lays images out for the vision tower: window reorder, padding to buckets, all index maps.

    Args:
      pixel_values: `[sum(t*h*w), patch_dim]` patch rows as `Qwen2VLImageProcessor` returns them (each 2x2
        merge unit is 4 consecutive rows).
      image_grid_thw: `[num_images, 3]` (t, h, w) patch grid of each image.
      config: the vision tower's shape.
      buckets: static sizes to pad to.
    """
    pixel_values = np.asarray(pixel_values)
    grid = _grids(image_grid_thw)
    m, unit, side = config.spatial_merge_size, config.merge_unit, config.window_units
    window_len = config.window_len
    if grid.shape[0] == 0:
        raise ValueError("image_grid_thw: no images")
    for i, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) <= 0 or h % m or w % m:
            raise ValueError(f"image {i}: grid (t, h, w) = {(t, h, w)} must be positive with h and w multiples of "
                             f"spatial_merge_size {m}")
        if h * w > buckets.max_image_patches:
            raise ValueError(
                f"image {i}: grid {h}x{w} = {h * w} patches ({h * config.patch_size}x{w * config.patch_size} "
                f"pixels) is over the pixel budget max_image_patches={buckets.max_image_patches}; resize it "
                f"(Qwen2VLImageProcessor max_pixels) or raise the budget")
    total = int(grid.prod(axis=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (total, config.patch_dim):
        raise ValueError(f"pixel_values: expected shape [{total}, {config.patch_dim}] for image_grid_thw "
                         f"{grid.tolist()}, got {pixel_values.shape}")

    # Each window is a list of global merge-unit ids (HF order); frames (image x t) own contiguous windows.
    windows: list[np.ndarray] = []
    frame_windows: list[range] = []
    unit_hw: list[np.ndarray] = []  # (row, col) of the top-left patch of every merge unit, HF order
    offset = 0
    for t, h, w in grid.tolist():
        gh, gw = h // m, w // m
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        for f in range(t):
            ids = np.arange(gh * gw).reshape(gh, gw) + offset + f * gh * gw
            first = len(windows)
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    windows.append(ids[r0:r0 + side, c0:c0 + side].reshape(-1))
            frame_windows.append(range(first, len(windows)))
            unit_hw.append(np.stack([rows.reshape(-1) * m, cols.reshape(-1) * m], axis=-1))
        offset += t * gh * gw
    unit_hw_all = np.concatenate(unit_hw, axis=0)  # [U, 2]

    num_windows = bucket_size(len(windows), buckets.windows, 1, "vision windows in the batch", fine=True)
    units_per_window = window_len // unit
    slot_unit = np.full((num_windows, units_per_window), -1, dtype=np.int64)
    for wi, ids in enumerate(windows):
        slot_unit[wi, :len(ids)] = ids
    valid_unit = slot_unit >= 0
    sub = np.arange(unit)
    src = (np.maximum(slot_unit, 0)[..., None] * unit + sub).reshape(num_windows, window_len)
    window_valid = np.repeat(valid_unit, unit, axis=1)
    patches = np.zeros((num_windows, window_len, config.patch_dim), pixel_values.dtype)
    patches[window_valid] = pixel_values[src[window_valid]]
    sub_hw = np.stack([sub // m, sub % m], axis=-1)  # [unit, 2]
    patch_hw = (unit_hw_all[np.maximum(slot_unit, 0)][:, :, None, :] + sub_hw).reshape(num_windows, window_len, 2)
    patch_hw = np.where(window_valid[..., None], patch_hw, 0).astype(np.int32)

    num_images = bucket_size(len(frame_windows), buckets.images, 1, "images (frames) in the batch")
    per_image = bucket_size(max(len(r) for r in frame_windows), buckets.image_windows, 1, "windows of one image",
                            fine=True)
    image_windows = np.zeros((num_images, per_image), dtype=np.int32)
    used = np.zeros((num_images, per_image), dtype=bool)
    window_slot = np.zeros((num_windows,), dtype=np.int32)
    for fi, r in enumerate(frame_windows):
        image_windows[fi, :len(r)] = r
        used[fi, :len(r)] = True
        window_slot[r.start:r.stop] = fi * per_image + np.arange(len(r))
    image_valid = (window_valid[image_windows] & used[..., None]).reshape(num_images, per_image * window_len)

    feature_gather = np.zeros((num_windows * units_per_window,), dtype=np.int32)
    flat_units = slot_unit.reshape(-1)
    feature_gather[flat_units[flat_units >= 0]] = np.flatnonzero(flat_units >= 0)
    return VisionInputs(patches=patches, patch_hw=patch_hw, window_valid=window_valid, image_windows=image_windows,
                        image_valid=image_valid, window_slot=window_slot, feature_gather=feature_gather)


def mrope_positions(input_ids: Any, image_grid_thw: Any | None, *, image_token_id: int, spatial_merge_size: int,
                    attention_mask: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D (temporal, height, width) positions of text + image prompts, as transformers' `get_rope_index`.

    Text tokens advance all three components together; the tokens of an image (t, h, w) get
    (start + t_idx, start + row, start + col) over its merged grid, and the text after it continues from
    `start + max(h, w) / merge`. Images are consumed in order across the batch (row-major), each taking
    exactly `t * h * w / merge**2` consecutive image tokens. Padding (attention_mask == 0) gets position 0.

    Returns:
      positions: `[3, B, T]` int32.
      rope_deltas: `[B]` int32; during decoding, the token that follows `n` real (unpadded) tokens has
        position `n + rope_deltas` in all three components.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else _grids(image_grid_thw)
    counts = num_image_tokens(grid, spatial_merge_size)
    positions = np.zeros((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch,), dtype=np.int64)
    image = 0
    for b in range(batch):
        idx = np.flatnonzero(mask[b])
        ids = input_ids[b, idx]
        out = np.zeros((3, len(ids)), dtype=np.int64)
        pos, i = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                ahead = np.flatnonzero(ids[i:] == image_token_id)
                j = i + int(ahead[0]) if len(ahead) else len(ids)
                out[:, i:j] = pos + np.arange(j - i)
                pos += j - i
                i = j
                continue
            if image >= len(grid):
                raise ValueError(f"input_ids row {b}: more <|image_pad|> runs than images in image_grid_thw "
                                 f"({len(grid)} images)")
            t, h, w = grid[image].tolist()
            n = int(counts[image])
            run = ids[i:i + n]
            if len(run) < n or np.any(run != image_token_id):
                raise ValueError(f"input_ids row {b}: image {image} with grid {(t, h, w)} needs {n} consecutive "
                                 f"<|image_pad|> tokens at index {idx[i]}, found "
                                 f"{int(np.argmin(np.append(run == image_token_id, False)))}")
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i:i + n] = pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
            pos += max(gh, gw)
            i += n
            image += 1
        positions[:, b, idx] = out
        deltas[b] = (out.max() + 1 if len(ids) else 0) - len(ids)
    if image != len(grid):
        raise ValueError(f"image_grid_thw has {len(grid)} images but input_ids hold <|image_pad|> tokens for "
                         f"{image}")
    return positions.astype(np.int32), deltas.astype(np.int32)


def image_token_index(input_ids: Any, num_features: int, *, image_token_id: int) -> np.ndarray:
    """`[B, T]` int32: for each `<|image_pad|>` token the row of the vision features it takes, else -1.

    Features fill image tokens in row-major order over the batch (as `masked_scatter` does in transformers).
    """
    is_image = np.asarray(input_ids) == image_token_id
    found = int(is_image.sum())
    if found != num_features:
        raise ValueError(f"input_ids hold {found} <|image_pad|> tokens (id {image_token_id}) but the images give "
                         f"{num_features} vision features; each image needs t*h*w/merge**2 tokens")
    index = np.full(is_image.shape, -1, dtype=np.int32)
    index[is_image] = np.arange(found, dtype=np.int32)
    return index


# ---------------------------------------------------------------------------------------- vision modules


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
           init: str = "normal", fan_in: int | None = None) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


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
    bias = jnp.where(key_valid, 0.0, _MASKED)[..., None, None, :]  # [..., 1, 1, K]
    scores = jnp.einsum("...hqd,...hkd->...hqk", q, k, preferred_element_type=jnp.float32) + bias
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
            return _param(rngs, (n, *shape), layers + axes, dt, init, fan_in)

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
                    inputs: VisionInputs) -> jax.Array:
    """Attention over all patches of each image: windows -> one row per image -> attention -> windows.

    q, k, v `[W, H, L, hd]` -> `[W, H, L, hd]`.
    """
    _, heads, length, hd = q.shape
    images, per_image = inputs.image_windows.shape
    q, k, v = (jnp.swapaxes(a[inputs.image_windows], 1, 2).reshape(images, heads, -1, hd)
               for a in (q, k, v))  # [I, H, V * L, hd]
    out = blocked_attention(q, k, v, inputs.image_valid, config.full_attention_block_scores)
    out = jnp.swapaxes(out.reshape(images, heads, per_image, length, hd), 1, 2).reshape(-1, heads, length, hd)
    return out[inputs.window_slot]  # [W, H, L, hd]


def vision_block(config: VisionConfig, x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array,
                 inputs: VisionInputs, full_attention: jax.Array) -> jax.Array:
    """One pre-norm block: (window or full) attention with 2-D rotary, then a SwiGLU MLP.

    x `[W, L, D]` in the window layout; w: one layer's weights; cos, sin `[W, L, head_dim]`; full_attention: a
    boolean scalar choosing the attention (`lax.cond`: only the chosen one runs).
    """
    h = rms_norm(x, w["norm1"], config.rms_norm_eps)
    qkv = jnp.einsum("wld,dshe->wlshe", h, w["qkv"]) + w["qkv_bias"]
    # Rotary in float32 as transformers does, the softmax scale folded into q, then heads-major [W, H, L, hd].
    q = apply_rope(qkv[:, :, 0].astype(jnp.float32), cos, sin) * config.head_dim**-0.5
    k = apply_rope(qkv[:, :, 1].astype(jnp.float32), cos, sin)
    q, k, v = (jnp.swapaxes(a.astype(x.dtype), 1, 2) for a in (q, k, qkv[:, :, 2]))
    out = jax.lax.cond(full_attention, lambda: _full_attention(config, q, k, v, inputs),
                       lambda: attention(q, k, v, inputs.window_valid))
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
        self.ln_q = _param(rngs, (d,), ("vision_norm",), dt, "ones")
        self.fc1 = _param(rngs, (wide, wide), ("vision_embed", "vision_mlp"), dt)
        self.fc1_bias = _param(rngs, (wide,), ("vision_mlp",), dt, "zeros")
        self.fc2 = _param(rngs, (wide, config.out_hidden_size), ("vision_mlp", "embed"), dt)
        self.fc2_bias = _param(rngs, (config.out_hidden_size,), ("embed",), dt, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[W, L, D]` -> `[W * L / merge_unit, out_hidden_size]`."""
        cfg, dt = self.config, self.config.dtype
        x = rms_norm(x, self.ln_q[...].astype(dt), cfg.rms_norm_eps)
        x = x.reshape(-1, cfg.hidden_size * cfg.merge_unit)
        x = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=False)
        return x @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class VisionTower(nnx.Module):
    """The Qwen2.5-VL vision transformer: window-layout patches in, merged features (HF order) out."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = _param(rngs, (config.patch_dim, config.hidden_size), ("vision_patch", "vision_embed"),
                                  config.param_dtype)
        self.blocks = VisionBlocks(config, rngs=rngs)
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Returns `[F, out_hidden_size]` merged features; rows past the batch's real feature count are padding."""
        cfg, dt = self.config, self.config.dtype
        x = jnp.einsum("wlp,pd->wld", inputs.patches.astype(dt), self.patch_embed[...].astype(dt))
        x = constrain(x, ("batch", None, "act_embed"))  # windows spread over the data-parallel axes
        cos, sin = vision_rotary(inputs.patch_hw, cfg.head_dim)
        block = with_remat(functools.partial(vision_block, cfg), cfg.remat)
        full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

        def step(x, layer):
            w, full_attention = layer
            return constrain(block(x, w, cos, sin, inputs, full_attention), ("batch", None, "act_embed")), None

        x, _ = jax.lax.scan(step, x, (self.blocks.stacked(dt), jnp.asarray(full)))
        return self.merger(x)[inputs.feature_gather]


# ------------------------------------------------------------------------------------------- the VL model


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Qwen2.5-VL: a Qwen2 decoder with `mrope_section`, a vision tower, the special token ids, image buckets."""

    text: Qwen2Config
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    buckets: VisionBuckets = VisionBuckets()

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ValueError("text config: Qwen2.5-VL needs rope_parameters.mrope_section (e.g. [16, 24, 24])")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    @property
    def num_parameters(self) -> int:
        """Parameter count from the shapes alone."""
        v = self.vision
        d, f, wide = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
        block = 2 * d + 3 * d * d + 3 * d + d * d + d + 3 * d * f + 2 * f + d
        merger = d + wide * wide + wide + wide * v.out_hidden_size + v.out_hidden_size
        return self.text.num_parameters + v.patch_dim * d + v.depth * block + merger

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, source: str = "config.json", dtype: Any = jnp.float32,
                buckets: VisionBuckets | None = None) -> Qwen2_5_VLConfig:
        """Reads a Hugging Face config dict: transformers 5 (`text_config`) or the hub layout (flat text keys)."""
        if "vision_config" not in d:
            raise KeyError(f"{source}: a qwen2_5_vl config needs a 'vision_config' object")
        text = dict(d["text_config"]) if "text_config" in d else dict(d)
        text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        return cls(
            text=Qwen2Config.from_hf(text, source=source, dtype=dtype, param_dtype=dtype),
            vision=VisionConfig.from_hf(d["vision_config"], dtype=dtype),
            image_token_id=int(d.get("image_token_id", 151655)), video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            buckets=buckets or VisionBuckets())

    def to_hf(self) -> dict[str, Any]:
        """The transformers 5 `Qwen2_5_VLConfig` dictionary (nested `text_config`)."""
        text = {k: v for k, v in self.text.to_hf().items() if k not in ("architectures", "dtype")}
        text["model_type"] = "qwen2_5_vl_text"
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": list(self.text.mrope_section)}
        dtype = "bfloat16" if jnp.dtype(self.text.param_dtype) == jnp.bfloat16 else "float32"
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "dtype": dtype,
            "text_config": text, "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }


class ModelInputs(NamedTuple):
    """Everything one forward pass takes, computed on the host (numpy) by `prepare_inputs`."""

    input_ids: Any  # [B, T] int32
    segment_ids: Any  # [B, T] int32, 0 = padding (the attention mask)
    positions: Any  # [3, B, T] int32 M-RoPE positions
    image_token_index: Any  # [B, T] int32 row of the vision features for <|image_pad|> tokens, else -1
    vision: VisionInputs | None  # None: text only
    rope_deltas: Any  # [B] int32: the token after n real tokens has position n + rope_deltas


def prepare_inputs(config: Qwen2_5_VLConfig, input_ids: Any, *, attention_mask: Any | None = None,
                   pixel_values: Any | None = None, image_grid_thw: Any | None = None) -> ModelInputs:
    """Host-side preparation: M-RoPE positions, the vision layout and the image-token index map."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, length], got shape {input_ids.shape}")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {input_ids.shape}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    merge = config.vision.spatial_merge_size
    if image_grid_thw is None:
        vision, num_features = None, 0
    else:
        vision = plan_vision_inputs(pixel_values, image_grid_thw, config.vision, config.buckets)
        num_features = int(num_image_tokens(image_grid_thw, merge).sum())
    index = image_token_index(np.where(mask > 0, input_ids, -1), num_features, image_token_id=config.image_token_id)
    positions, deltas = mrope_positions(input_ids, image_grid_thw, image_token_id=config.image_token_id,
                                        spatial_merge_size=merge, attention_mask=mask)
    return ModelInputs(input_ids=input_ids.astype(np.int32), segment_ids=mask, positions=positions,
                       image_token_index=index, vision=vision, rope_deltas=deltas)


def merge_image_features(inputs_embeds: jax.Array, features: jax.Array, index: jax.Array) -> jax.Array:
    """Replaces the embeddings of image tokens, in order, by vision features.

    inputs_embeds `[B, T, D]`, features `[F, D]`, index `[B, T]` (-1: keep the text embedding).
    """
    picked = jnp.take(features.astype(inputs_embeds.dtype), jnp.maximum(index, 0), axis=0)  # [B, T, D]
    return jnp.where((index >= 0)[..., None], picked, inputs_embeds)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL: vision tower + Qwen2 decoder (`language_model`) with M-RoPE."""

    model_type = "qwen2_5_vl"

    def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = VisionTower(config.vision, rngs=rngs)
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


def logits_from_inputs(model: Qwen2_5_VLForConditionalGeneration, inputs: ModelInputs) -> jax.Array:
    """Logits `[B, T, vocab]` float32 of host-prepared inputs (e.g. `Qwen2_5_VLProcessor(...).model_inputs`).

    Compiled once per (text length, vision bucket) shape combination.
    """
    return _logits_jit(model, inputs._replace(rope_deltas=None))


@nnx.jit
def _logits_jit(model: Qwen2_5_VLForConditionalGeneration, inputs: ModelInputs) -> jax.Array:
    hidden, _ = model.forward(inputs.input_ids, positions=inputs.positions, segment_ids=inputs.segment_ids,
                              image_token_index=inputs.image_token_index, vision=inputs.vision)
    return model.logits(hidden)
