"""Helpers for the Qwen2.5-VL tests: the tiny transformers config, tokenizer, prompts and images."""

from __future__ import annotations

import numpy as np

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


SIZES = [(200, 300), (90, 150), (330, 250)]  # (height, width): non-square, grids that need window padding


def conversation(num_images: int, question: str = "Where does the picture of the bridge go?"):
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def images_for(num_images: int, seed: int = 0):
    return [random_image(h, w, seed + i) for i, (h, w) in enumerate(SIZES[:num_images])]
