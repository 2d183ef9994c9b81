"""Fixtures for the Qwen2.5-VL tests: a tiny random transformers model, tokenizer and image processor on disk."""

from __future__ import annotations

import numpy as np
import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
IMAGE_TOKEN_ID = SPECIALS.index("<|image_pad|>")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 336 * 336


def tiny_hf_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=SPECIALS.index("<|video_pad|>"),
        vision_start_token_id=SPECIALS.index("<|vision_start|>"), vision_end_token_id=SPECIALS.index("<|vision_end|>"),
        vocab_size=512)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["Where does the picture of the bridge go?", "A cat sits on a red mat.",
                            "You are a helpful assistant.", "system user assistant"], trainer)
    return Qwen2TokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, additional_special_tokens=SPECIALS[3:])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A directory with a random tiny Qwen2.5-VL (float32), its tokenizer and preprocessor config."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def jax_model(tiny_checkpoint):
    from m2io_jax.models import from_pretrained

    return from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def processor(tiny_checkpoint, jax_model):
    from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

    return Qwen2_5_VLProcessor.from_pretrained(tiny_checkpoint, config=jax_model.config)


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_logits(hf_model, batch) -> np.ndarray:
    """Logits of the transformers model on a processed batch."""
    import torch

    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.hf_kwargs().items()}
    kwargs["input_ids"] = kwargs["input_ids"].long()
    with torch.no_grad():
        return hf_model(**kwargs).logits.numpy()
