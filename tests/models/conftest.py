"""Fixtures for the Qwen2.5-VL model tests: a tiny random transformers model, tokenizer and image processor on disk."""

from __future__ import annotations

import pytest

from tests.models.qwen2_5_vl_helpers import MAX_PIXELS, MIN_PIXELS, tiny_hf_config, tiny_tokenizer


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
