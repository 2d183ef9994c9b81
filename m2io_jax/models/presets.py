"""Named model shapes, for abstract use (memory and FLOP planning, AOT compiles) without a checkpoint.

Checkpoints always read their own config.json; these presets mirror the published Qwen2.5 configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from m2io_jax.models.qwen2 import Qwen2Config

_QWEN_COMMON = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)

QWEN2_PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                **_QWEN_COMMON),
    "qwen2.5-1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                **_QWEN_COMMON),
    "qwen2.5-3b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                              num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                              **_QWEN_COMMON),
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                              **_QWEN_COMMON),
}


def qwen2_preset(name: str, **overrides: Any) -> Qwen2Config:
    """A named Qwen2.5 shape (e.g. 'qwen2.5-3b'), with field overrides such as dtype or remat."""
    if name not in QWEN2_PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(QWEN2_PRESETS)}")
    return dataclasses.replace(QWEN2_PRESETS[name], **overrides)
