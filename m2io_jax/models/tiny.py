"""Tiny Qwen checkpoints built from scratch on the host: a byte-level BPE tokenizer trained on given texts and a
randomly initialised Qwen2 or Qwen2.5-VL model, saved as a Hugging Face directory.

This is how the CPU demo and the tests get models without a hub: the directory it writes is the same kind a
TPU user points `from_pretrained` at (config.json, model.safetensors, tokenizer files, and for the VL model
preprocessor_config.json), so everything downstream runs the real loading path. No torch is imported.

    build_tiny_checkpoint("/tmp/tiny_vl", texts, kind="qwen2_5_vl", shape={"hidden_size": 64})
    model = m2io_jax.models.from_pretrained("/tmp/tiny_vl")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import nnx

# The Qwen special tokens in the order the tiny tokenizer numbers them (ids 0..6).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

TEXT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True)
"""Default decoder shape: head_dim 16, so the M-RoPE sections (2, 3, 3) sum to head_dim // 2."""

VISION_SHAPE = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
"""Default vision tower: 2 blocks (one windowed, one full attention), windows of 2x2 merged patches."""

KINDS = ("qwen2", "qwen2_5_vl")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer (Hugging Face `tokenizers`) trained on `texts`, wrapped as a transformers
    `Qwen2TokenizerFast` with the Qwen special tokens, `<|im_end|>` as eos and `<|endoftext|>` as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: the {len(SPECIAL_TOKENS)} special "
                         f"tokens and 256 bytes need more than {len(SPECIAL_TOKENS) + 256}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None, additional_special_tokens=list(SPECIAL_TOKENS[3:]))
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def hf_config(kind: str, vocab_size: int, *, text_shape: Mapping[str, Any] | None = None,
              vision_shape: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Hugging Face config.json dictionary of a tiny model of `kind` ("qwen2" or "qwen2_5_vl")."""
    if kind not in KINDS:
        raise ValueError(f"tiny model kind {kind!r}: expected one of {KINDS}")
    text = {**TEXT_SHAPE, **(text_shape or {}), "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
            "bos_token_id": None, "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
            "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>")}
    if kind == "qwen2":
        return {**text, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    unit = head_dim // 16  # M-RoPE sections (t, h, w) in the proportions of Qwen2.5-VL's (16, 24, 24)
    if unit < 1:
        raise ValueError(f"head_dim {head_dim} (hidden_size / num_attention_heads) must be at least 16 for M-RoPE")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": [2 * unit, 3 * unit, head_dim // 2 - 5 * unit]}
    vision = {**VISION_SHAPE, **(vision_shape or {}), "in_channels": 3, "out_hidden_size": text["hidden_size"]}
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": {**text, "model_type": "qwen2_5_vl_text"}, "vision_config": vision,
        "image_token_id": SPECIAL_TOKENS.index("<|image_pad|>"),
        "video_token_id": SPECIAL_TOKENS.index("<|video_pad|>"),
        "vision_start_token_id": SPECIAL_TOKENS.index("<|vision_start|>"),
        "vision_end_token_id": SPECIAL_TOKENS.index("<|vision_end|>"),
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def init_model(config: Mapping[str, Any], *, seed: int = 0) -> nnx.Module:
    """A randomly initialised model (float32) for a Hugging Face config dictionary of a supported kind."""
    kind = config.get("model_type")
    if kind == "qwen2":
        from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config.from_hf(dict(config), source="tiny config"), rngs=nnx.Rngs(seed))
    if kind == "qwen2_5_vl":
        from m2io_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig.from_hf(config, source="tiny config")
        return Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))
    raise ValueError(f"tiny config model_type {kind!r}: expected one of {KINDS}")


def build_tiny_checkpoint(path: str | os.PathLike, texts: Sequence[str], *, kind: str, vocab_size: int = 1024,
                          text_shape: Mapping[str, Any] | None = None, vision_shape: Mapping[str, Any] | None = None,
                          seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> str:
    """Trains a tokenizer on `texts`, initialises a model of `kind` and writes both to `path`; returns `path`.

    For "qwen2_5_vl" it also writes the image processor's preprocessor_config.json with the given pixel range
    (the demo's 96x96 images become 6x6 patches, 9 vision tokens each, at the defaults).
    """
    from m2io_jax.models.registry import save_pretrained

    path = os.fspath(path)
    tokenizer = train_tokenizer(texts, vocab_size)
    model = init_model(hf_config(kind, len(tokenizer), text_shape=text_shape, vision_shape=vision_shape), seed=seed)
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    if kind == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        patch = model.config.vision.patch_size
        merge = model.config.vision.spatial_merge_size
        Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch,
                                 merge_size=merge).save_pretrained(path)
    return path
