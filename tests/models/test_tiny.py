"""Tiny checkpoints built from scratch (tokenizer trained on given texts, random model) load through the real path."""

from __future__ import annotations

import numpy as np
import pytest

from m2io_jax.models import from_pretrained, tiny

TEXTS = ["Where does the picture of the bridge go?", "A cat sits on a red mat. Then it sleeps.",
         "You are a helpful assistant.", "Pour the batter into the pan and bake for 20 minutes."] * 8


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vl"), TEXTS, kind="qwen2_5_vl", vocab_size=400)


def test_tokenizer_round_trips_and_numbers_special_tokens():
    tokenizer = tiny.train_tokenizer(TEXTS, vocab_size=400)
    text = "Pour the batter <|image_pad|> into the pan.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == list(range(len(tiny.SPECIAL_TOKENS)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_vl_checkpoint_loads_and_processes_an_image(tiny_vl):
    from PIL import Image

    from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

    model = from_pretrained(tiny_vl)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    processor = Qwen2_5_VLProcessor.from_pretrained(tiny_vl, config=model.config)
    assert model.config.text.vocab_size == len(processor.tokenizer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where does it go?"}]}]
    batch = processor([conversation], [[image]])
    assert batch.image_grid_thw.tolist() == [[1, 6, 6]]  # 96 px -> 84 px -> 6 x 6 patches of 14
    assert int((batch.input_ids == model.config.image_token_id).sum()) == 9  # merged 2 x 2
    logits = np.asarray(model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.attention_mask))
    assert logits.shape == (1, batch.input_ids.shape[1], model.config.text.vocab_size)
    assert np.isfinite(logits).all()


def test_text_checkpoint_reloads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny.build_tiny_checkpoint(tmp_path, TEXTS, kind="qwen2", vocab_size=400, seed=3)
    ours = from_pretrained(path)
    ids = np.array([[5, 17, 42, 9, 100]], np.int32)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, np.ones_like(ids))), expected, atol=1e-5)


def test_vl_mrope_sections_follow_qwen_proportions():
    config = tiny.hf_config("qwen2_5_vl", 400)
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]  # head_dim 16, as (16, 24, 24)
    wide = tiny.hf_config("qwen2_5_vl", 400, text_shape={"hidden_size": 128, "num_attention_heads": 4})
    assert wide["text_config"]["rope_parameters"]["mrope_section"] == [4, 6, 6]  # head_dim 32


def test_negative_mrope_section_is_refused():
    from m2io_jax.models.qwen2 import Qwen2Config

    with pytest.raises(ValueError, match="must be positive"):
        Qwen2Config(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=(4, 6, -2))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        tiny.hf_config("llama", 400)
