"""Host-side (numpy) planning of Qwen2.5-VL inputs: vision layout, M-RoPE positions, image-token index maps.

The host turns any list of images (`pixel_values`, `image_grid_thw` exactly as `Qwen2VLImageProcessor` returns
them) into a `VisionInputs` whose canonical layout is **padded windows** `[num_windows, window_len]` (see
`qwen2_5_vl` for how the tower uses it). Every index map is computed here; shapes depend only on the bucket
sizes, so a new image size does not recompile inside a bucket and no Python loop over images runs under jit.

`mrope_positions` reproduces transformers' `get_rope_index` for images; `prepare_inputs` gathers everything one
forward pass takes into the models' `PreparedInputs`, and `prepare_prompt_batch` does the same for token-id
prompts with per-prompt processor outputs (the sampler's and trainer's entry, through the model protocol).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from m2io_jax.buckets import bucket_size
from m2io_jax.models.protocol import PreparedInputs, left_pad
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionBuckets, VisionConfig


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


def prepare_inputs(config: Qwen2_5_VLConfig, input_ids: Any, *, attention_mask: Any | None = None,
                   pixel_values: Any | None = None, image_grid_thw: Any | None = None) -> PreparedInputs:
    """Host-side preparation of a left-padded batch: M-RoPE positions, the position after each prompt, the
    vision layout and the image-token index map."""
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
    next_position = (mask.sum(axis=1) + deltas).astype(np.int32)
    return PreparedInputs(ids=input_ids.astype(np.int32), mask=mask, positions=positions,
                          next_position=next_position, image_index=index, vision=vision)


def _image_arrays(item: Any, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixel_values, image_grid_thw) of one prompt's processor output (a mapping or an object), or None."""
    if item is None:
        return None
    get = item.get if isinstance(item, dict) else functools.partial(getattr, item)
    try:
        pixels, grid = get("pixel_values"), get("image_grid_thw")
    except (KeyError, AttributeError) as e:
        raise ValueError(f"{where}: expected the processor output of one prompt with 'pixel_values' and "
                         f"'image_grid_thw'; got {type(item).__name__}") from e
    if pixels is None or grid is None:
        return None
    return np.asarray(pixels, np.float32), np.asarray(grid, np.int64).reshape(-1, 3)


def prompt_images(config: Qwen2_5_VLConfig, prompts: Sequence[Sequence[int]],
                  images: Sequence[Any] | None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(pixel_values, image_grid_thw) or None per prompt, checked against the prompts' image tokens.

    Raises naming the prompt index when `images` is not one item per prompt or when a prompt's image-token
    count differs from its images' feature count.
    """
    if images is None:
        return [None] * len(prompts)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != len(prompts):
        raise ValueError(f"images must be a list with one processor output (or None) per prompt: "
                         f"{len(prompts)} prompts")
    out = []
    for i, (prompt, item) in enumerate(zip(prompts, images)):
        arrays = _image_arrays(item, f"images[{i}]")
        found = sum(int(t) == config.image_token_id for t in prompt)
        needed = 0 if arrays is None else int(num_image_tokens(arrays[1], config.vision.spatial_merge_size).sum())
        if found != needed:
            raise ValueError(f"prompts[{i}] holds {found} image tokens (id {config.image_token_id}) but images[{i}] "
                             f"gives {needed} vision features")
        out.append(arrays)
    return out


def prepare_prompt_batch(config: Qwen2_5_VLConfig, prompts: Sequence[Sequence[int]], images: Sequence[Any] | None,
                         *, rows: int, length: int) -> PreparedInputs:
    """Token-id prompts and their per-prompt processor outputs, left-padded to [rows, length] and prepared."""
    arrays = [a for a in prompt_images(config, prompts, images) if a is not None]
    ids, mask = left_pad(prompts, rows, length)
    pixels = np.concatenate([a[0] for a in arrays]) if arrays else None
    grid = np.concatenate([a[1] for a in arrays]) if arrays else None
    return prepare_inputs(config, ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


def placeholder_prompts(config: Qwen2_5_VLConfig, batch_size: int, prompt_length: int,
                        image_grid_thw: Any | None) -> tuple[list[list[int]], list[Any] | None]:
    """Prompts of `prompt_length` tokens holding the images' placeholder tokens, images dealt out in turn, with
    zero pixels: the shapes a batch of such images compiles to."""
    filler = 1 if config.image_token_id != 1 else 0
    if image_grid_thw is None:
        return [[filler] * prompt_length for _ in range(batch_size)], None
    grid = _grids(image_grid_thw)
    tokens = num_image_tokens(grid, config.vision.spatial_merge_size)
    prompts, images = [], []
    for i in range(batch_size):
        mine = np.arange(i, len(grid), batch_size)
        n = int(tokens[mine].sum())
        if n > prompt_length:
            raise ValueError(f"image_grid_thw: prompt {i} of {batch_size} would hold {n} image tokens (images "
                             f"{mine.tolist()}), more than prompt_length={prompt_length}")
        prompts.append([config.image_token_id] * n + [filler] * (prompt_length - n))
        pixels = np.zeros((int(grid[mine].prod(axis=1).sum()), config.vision.patch_dim), np.float32)
        images.append({"pixel_values": pixels, "image_grid_thw": grid[mine]} if len(mine) else None)
    return prompts, images
