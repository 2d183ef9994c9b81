"""Host-side Qwen2.5-VL processor: chat template, images, `<|image_pad|>` expansion, M-RoPE positions.

transformers' `Qwen2_5_VLProcessor` cannot be built without torchvision (it insists on a video processor), so
this is the one home of that job here: the tokenizer (Hugging Face `tokenizers`), transformers'
`Qwen2VLImageProcessor` on its PIL path, the Qwen2-VL chat template, and `prepare_inputs` for positions,
the bucketed vision layout and the image-token index map. Everything it returns is numpy.

    processor = Qwen2_5_VLProcessor.from_pretrained("/ckpt/Qwen2.5-VL-3B-Instruct", config=model.config)
    batch = processor([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]],
                      images=[[open("cat.jpg", "rb").read()]])
    logits = model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.attention_mask)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from m2io_jax.models.protocol import PreparedInputs
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig
from m2io_jax.models.qwen2_5_vl_inputs import num_image_tokens, prepare_inputs

IMAGE_PAD = "<|image_pad|>"

# The Qwen2-VL / Qwen2.5-VL chat template (used when the tokenizer and checkpoint carry none).
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ImageLike = Any  # PIL.Image.Image | bytes | str | os.PathLike | np.ndarray [H, W, 3] uint8


def load_image(source: ImageLike, *, name: str, max_input_pixels: int | None = None) -> Image.Image:
    """Decodes one image to RGB, with errors that name it (`name`, e.g. "prompt 0 image 1")."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(source))
            image.load()
        except Exception as e:  # PIL raises several types for corrupt data
            raise ValueError(f"{name}: cannot decode image bytes ({len(source)} bytes): {e}") from e
    elif isinstance(source, (str, os.PathLike)):
        try:
            image = Image.open(source)
            image.load()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name}: image file {os.fspath(source)!r} does not exist") from e
        except Exception as e:
            raise ValueError(f"{name}: cannot decode image file {os.fspath(source)!r}: {e}") from e
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] not in (1, 3, 4) or source.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 array [H, W, 1|3|4], got {source.dtype} {source.shape}")
        if 0 in source.shape[:2]:
            raise ValueError(f"{name}: image has zero size {source.shape[1]}x{source.shape[0]}")
        image = Image.fromarray(source[..., 0] if source.shape[-1] == 1 else source)
    else:
        raise TypeError(f"{name}: unsupported image type {type(source).__name__}; expected PIL image, bytes, path "
                        f"or uint8 array")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name}: image has zero size {width}x{height}")
    if max_input_pixels is not None and width * height > max_input_pixels:
        raise ValueError(f"{name}: image of {width}x{height} = {width * height} pixels is over the input pixel budget "
                         f"max_input_pixels={max_input_pixels}")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ProcessedBatch:
    """A processed batch: the Hugging Face arrays (numpy) and the model's prepared inputs."""

    input_ids: np.ndarray  # [B, T] int32, left-padded
    attention_mask: np.ndarray  # [B, T] int32
    pixel_values: np.ndarray | None  # [sum(t*h*w), C*T*P*P] float32, as Qwen2VLImageProcessor returns it
    image_grid_thw: np.ndarray | None  # [num_images, 3] int64
    model_inputs: PreparedInputs  # positions [3, B, T], next_position [B], vision layout, image-token index

    def hf_kwargs(self) -> dict[str, np.ndarray]:
        """Keyword arguments for transformers' Qwen2_5_VLForConditionalGeneration (convert to torch there)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
               "mm_token_type_ids": (self.model_inputs.image_index >= 0).astype(np.int64)}
        if self.pixel_values is not None:
            out.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return out


class Qwen2_5_VLProcessor:
    """Turns chat prompts and their images into model inputs (see the module docstring)."""

    def __init__(self, tokenizer: Any, image_processor: Any, config: Qwen2_5_VLConfig, *,
                 chat_template: str | None = None, max_input_pixels: int | None = 64 * 2**20):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.max_input_pixels = max_input_pixels
        ours = (image_processor.patch_size, image_processor.merge_size)
        model = (config.vision.patch_size, config.vision.spatial_merge_size)
        if ours != model:
            raise ValueError(f"image processor (patch, merge) = {ours} does not match the model's {model}")
        budget = config.buckets.max_image_patches * config.vision.patch_size**2
        max_pixels = getattr(image_processor.size, "longest_edge", None)
        if max_pixels is not None and max_pixels > budget:
            raise ValueError(f"image processor max_pixels={max_pixels} is over the model's pixel budget {budget} "
                             f"(VisionBuckets.max_image_patches={config.buckets.max_image_patches} patches of "
                             f"{config.vision.patch_size}x{config.vision.patch_size}); lower max_pixels or raise "
                             f"the budget")
        pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if pad_id != config.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_PAD} to {pad_id}, the model config expects image_token_id "
                             f"{config.image_token_id}")

    @classmethod
    def from_pretrained(cls, path: str, config: Qwen2_5_VLConfig | None = None, **image_kwargs: Any,
                        ) -> Qwen2_5_VLProcessor:
        """Tokenizer, preprocessor_config.json and chat template of a local Qwen2.5-VL checkpoint directory.

        image_kwargs (e.g. min_pixels, max_pixels) override preprocessor_config.json. A max_pixels over the
        model's pixel budget (`config.buckets.max_image_patches` patches) is lowered to it, so that the image
        processor resizes every image to fit; an explicit max_pixels over the budget is an error.
        """
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if config is None:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = Qwen2_5_VLConfig.from_hf(json.load(f), source=os.path.join(path, "config.json"))
        tokenizer = AutoTokenizer.from_pretrained(path)

        def image_processor_with(**kwargs: Any) -> Qwen2VLImageProcessorPil:
            if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
                return Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
            return Qwen2VLImageProcessorPil(**kwargs)

        image_processor = image_processor_with(**image_kwargs)
        budget = config.buckets.max_image_patches * config.vision.patch_size**2
        if "max_pixels" not in image_kwargs and image_processor.size.longest_edge > budget:
            image_processor = image_processor_with(**image_kwargs, max_pixels=budget)
        template = None
        template_path = os.path.join(path, "chat_template.json")
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        return cls(tokenizer, image_processor, config, chat_template=template)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Renders one conversation (Hugging Face message format; images as {"type": "image"}) to text."""
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, prompts: Sequence[str | Sequence[dict[str, Any]]],
                 images: Sequence[Sequence[ImageLike]] | None = None, *, add_generation_prompt: bool = True,
                 pad_to: int | None = None) -> ProcessedBatch:
        """Processes a batch of prompts.

        Args:
          prompts: per row either a conversation (list of messages, rendered with the chat template) or text
            that already holds one `<|image_pad|>` per image.
          images: per row, its images in order (PIL images, encoded bytes, paths or uint8 arrays).
          add_generation_prompt: end conversations with the assistant header.
          pad_to: left-pad every row to this length (static shapes); None pads to the longest row.
        """
        images = [[] for _ in prompts] if images is None else [list(row) for row in images]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(images)} rows")
        texts = [p if isinstance(p, str) else self.apply_chat_template(p, add_generation_prompt=add_generation_prompt)
                 for p in prompts]
        decoded = []
        for b, (text, row) in enumerate(zip(texts, images)):
            found = text.count(IMAGE_PAD)
            if found != len(row):
                raise ValueError(f"prompt {b}: {found} {IMAGE_PAD} placeholders but {len(row)} images")
            decoded += [load_image(img, name=f"prompt {b} image {i}", max_input_pixels=self.max_input_pixels)
                        for i, img in enumerate(row)]
        pixel_values = grid = None
        if decoded:
            out = self.image_processor(images=decoded, return_tensors="np")
            pixel_values = np.asarray(out["pixel_values"], np.float32)
            grid = np.asarray(out["image_grid_thw"], np.int64)
            counts = iter(num_image_tokens(grid, self.config.vision.spatial_merge_size).tolist())
            texts = [_expand_image_pads(t, counts) for t in texts]
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        length = max(len(r) for r in rows) if pad_to is None else pad_to
        too_long = [b for b, r in enumerate(rows) if len(r) > length]
        if too_long:
            raise ValueError(f"prompt {too_long[0]}: {len(rows[too_long[0]])} tokens do not fit pad_to={length}")
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            if r:
                input_ids[b, length - len(r):] = r
                mask[b, length - len(r):] = 1
        model_inputs = prepare_inputs(self.config, input_ids, attention_mask=mask, pixel_values=pixel_values,
                                      image_grid_thw=grid)
        return ProcessedBatch(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                              image_grid_thw=grid, model_inputs=model_inputs)


def _expand_image_pads(text: str, counts) -> str:
    """Replaces each `<|image_pad|>` by as many copies as its image has merged vision features."""
    pieces = text.split(IMAGE_PAD)
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(IMAGE_PAD * next(counts))
        out.append(piece)
    return "".join(out)
