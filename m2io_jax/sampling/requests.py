"""Host side of a sampling request: validation before anything compiles, bucket sizes and the row layout.

A request's prompts become prefill rows: one row per prompt with G samples each (shared prefill), or, the
peers' way, G rows per prompt with one sample each. Each row knows its (prompt, sample) indices, which fix
its random keys, so tokens do not depend on the layout or the batch composition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static sizes the sampler pads to. A None list means powers of two, at least the given minimum."""

    prompt_lengths: tuple[int, ...] | None = None
    new_token_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    min_prompt_length: int = 16
    min_new_tokens: int = 16
    min_batch_size: int = 1


DEFAULT_BUCKETS = Buckets()


@dataclasses.dataclass
class SampleOutput:
    """Samples of `generate`: row i is sample `sample_index[i]` of prompt `prompt_index[i]`.

    Samples of one prompt are adjacent. `tokens[i]` are the new token ids (a stop token, when hit, included);
    `logprobs[i][t]` is log softmax(logits / temperature) of `tokens[i][t]` (temperature 1 when greedy).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    prompt_index: list[int]
    sample_index: list[int]


def validate_request(model: Any, prompts: Any, max_new_tokens: int, num_samples: int, temperature: float,
                     top_k: int | None, top_p: float | None, stop_tokens: Sequence[int]) -> list[list[int]]:
    """Checks the request against the model (`CausalLM.vocab_size`, `max_length`) before anything is compiled;
    returns the prompts as int lists."""
    vocab, max_length = model.vocab_size, model.max_length
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab}]; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompts[{i}] must be a flat list of int token ids; got array of shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"prompts[{i}][{j}] = {int(ids[j])} is outside the vocabulary [0, {vocab})")
        if ids.size + max_new_tokens > max_length:
            raise ValueError(f"prompts[{i}] has {ids.size} tokens; with max_new_tokens={max_new_tokens} it needs "
                             f"{ids.size + max_new_tokens} cache slots, more than the model's "
                             f"max_position_embeddings={max_length}")
        out.append([int(t) for t in ids])
    for t in stop_tokens:
        if not 0 <= int(t) < vocab:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {vocab})")
    return out


def request_rows(prompts: list[list[int]], images: Sequence[Any] | None, num_samples: int, *,
                 repeated: bool) -> tuple[list[list[int]], list[Any] | None, np.ndarray, np.ndarray]:
    """The prefill rows of a request and their (prompt, sample) indices: one row per prompt with
    `num_samples` samples each, or (`repeated`, the peers' way) `num_samples` rows per prompt with one sample.

    Returns rows, their images (or None), prompt_index `[R]` and sample_index `[R, G]`.
    """
    b = len(prompts)
    images = None if images is None else list(images)
    if not repeated:
        sample_index = np.broadcast_to(np.arange(num_samples, dtype=np.int32), (b, num_samples))
        return prompts, images, np.arange(b, dtype=np.int32), sample_index
    rows = [x for x in prompts for _ in range(num_samples)]
    row_images = None if images is None else [x for x in images for _ in range(num_samples)]
    prompt_index = np.repeat(np.arange(b, dtype=np.int32), num_samples)
    sample_index = np.tile(np.arange(num_samples, dtype=np.int32), b)[:, None]
    return rows, row_images, prompt_index, sample_index
