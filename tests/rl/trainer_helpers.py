"""Shared pieces of the trainer tests: a tiny random text Qwen2, trainer configs and a token-set reward."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m2io_jax.models import tiny
from m2io_jax.rl import config as rl_config
from m2io_jax.rl.trainer import RewardResult

VOCAB = 64
STOP = 2
TEXT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
PROMPTS = [[1, 3, 4], [7, 8, 9, 10], [30, 31], [40, 41, 42, 43, 44]]
TARGET = np.zeros(VOCAB, bool)
TARGET[8:24] = True  # the "good" tokens of the token-set reward: a quarter of the vocabulary


def tiny_text_model(seed: int = 0, **shape):
    """A random tiny text Qwen2 (float32) of VOCAB tokens."""
    return tiny.init_model(tiny.hf_config("qwen2", VOCAB, text_shape={**TEXT_SHAPE, **shape}), seed=seed)


def trainer_config(*, max_new_tokens: int = 8, num_generations: int = 8, learning_rate: float = 3e-2, seed: int = 0,
                   **grpo):
    """A trainer config for the tiny models: float32 compute, no warmup, a high learning rate."""
    config = rl_config.get_trainer_config()
    config.rollout.max_new_tokens = max_new_tokens
    config.rollout.seed = seed
    config.grpo.num_generations = num_generations
    config.grpo.update(grpo)
    config.optimizer.update(learning_rate=learning_rate, warmup_steps=0, total_steps=1000, compute_dtype="float32")
    return config


def target_fraction(completions: Sequence[Sequence[int]]) -> np.ndarray:
    """Per completion, the fraction of its tokens in TARGET (0 for an empty completion)."""
    return np.array([TARGET[np.asarray(c, int)].mean() if len(c) else 0.0 for c in completions])


def fraction_reward(sign: float = 1.0):
    """A reward function: sign * the fraction of completion tokens in TARGET, with that fraction as a component."""

    def reward(examples, completions):
        fraction = target_fraction(completions)
        return RewardResult(sign * fraction, {"fraction": fraction}, {"empty": sum(1 for c in completions if not c)})

    return reward
