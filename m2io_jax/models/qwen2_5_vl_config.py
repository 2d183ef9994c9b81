"""Qwen2.5-VL configuration: the vision tower's shape, the image buckets and the whole model's config.

Below both the host-side planning (`qwen2_5_vl_inputs`) and the device modules (`qwen2_5_vl`), which read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from m2io_jax.models.qwen2 import REMAT_POLICIES, Qwen2Config


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

