"""Host side of a training step: per-step seeds and the padded arrays the device programs take.

A step's B prompts are padded to R rows (a bucket); each row holds G completions padded to N tokens. Rows past
the B prompts only fill the bucket: their `row_mask` is 0 and they carry no loss. Everything here is numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def step_seed(seed: int, step: int) -> int:
    """A 32-bit sampling seed for training step `step`, derived from the configured `seed`.

    The sampler's keys fold only the (prompt, sample) indices of a call into the seed, so one fixed seed would
    draw the same streams every step; hashing (seed, step) gives every step its own.
    """
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])


@dataclasses.dataclass
class Completions:
    """G completions of each of R prompt rows, padded to N tokens (rows past the real prompts are padding)."""

    tokens: np.ndarray  # [R, G, N] int32, a padding id past each completion's length
    mask: np.ndarray  # [R, G, N] float32, 1 on the completion's tokens
    lengths: np.ndarray  # [R, G] int32
    truncated: np.ndarray  # [R, G] bool: reached the budget without a stop token
    row_mask: np.ndarray  # [R] float32, 1 on the rows of real prompts

    @property
    def num_tokens(self) -> int:
        """Number of real completion tokens."""
        return int(self.mask.sum())


def pad_completions(sequences: Sequence[Sequence[int]], *, rows: int, num_samples: int, length: int,
                    stop_tokens: Sequence[int], budget: int, pad_id: int = 0) -> Completions:
    """Lays out B * G completions (prompt-major: the G of prompt 0 first) as [rows, G, length] arrays.

    Padding holds `pad_id` (choose a token the log-prob pass does not suppress: a suppressed token's log-prob is
    -inf, whose gradient is NaN even under a zero mask).

    A completion is truncated when it holds `budget` tokens and its last one is not a stop token.
    Raises naming the completion when one is longer than `length`, or when the count is not a multiple of G.
    """
    if len(sequences) % num_samples or len(sequences) // num_samples > rows:
        raise ValueError(f"{len(sequences)} completions do not form at most {rows} groups of "
                         f"num_samples={num_samples}")
    tokens = np.full((rows, num_samples, length), pad_id, np.int32)
    mask = np.zeros((rows, num_samples, length), np.float32)
    lengths = np.zeros((rows, num_samples), np.int32)
    truncated = np.zeros((rows, num_samples), bool)
    stops = set(int(t) for t in stop_tokens)
    for index, sequence in enumerate(sequences):
        row, sample = divmod(index, num_samples)
        n = len(sequence)
        if n > length:
            raise ValueError(f"completion {index} has {n} tokens, more than the padded length {length}")
        tokens[row, sample, :n] = sequence
        mask[row, sample, :n] = 1.0
        lengths[row, sample] = n
        truncated[row, sample] = n >= budget and (n == 0 or int(sequence[-1]) not in stops)
    row_mask = np.zeros((rows,), np.float32)
    row_mask[:len(sequences) // num_samples] = 1.0
    return Completions(tokens, mask, lengths, truncated, row_mask)


def pad_logprobs(values: Sequence[Sequence[float]], like: Completions) -> np.ndarray:
    """Per-token values of B * G completions (prompt-major) as [R, G, N] float32 in `like`'s layout."""
    rows, g, n = like.tokens.shape
    out = np.zeros((rows, g, n), np.float32)
    for index, sequence in enumerate(values):
        row, sample = divmod(index, g)
        out[row, sample, :len(sequence)] = sequence
    return out
