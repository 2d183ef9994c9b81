"""The inserter's reward function for the generic trainer: completion token ids -> rewards of each completion.

The trainer (`m2io_jax.rl`) knows nothing of images in text: it samples G completions per prompt and hands
the batch's examples and the completions' token ids to a reward function. `RewardAdapter` is that function for
the inserter: it decodes each completion (`decode_completion`: up to its first stop token), scores it with
`rewards.score_completion` against the example of its prompt, and returns the totals, each component and the
counts the logs need. The entry point wraps the result in the trainer's `RewardResult` (the inserter does not
import `m2io_jax.rl`).

A component that does not apply to a completion's example (placement without gold anchors; text preservation
outside the `inline` format) is NaN there; components that apply to no completion of the batch are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from m2io_jax.inserter import rewards as rewards_lib
from m2io_jax.inserter.example import InsertionExample


def decode_completion(tokenizer: Any, token_ids: Sequence[int], stop_tokens: Sequence[int], *,
                      skip_special_tokens: bool = False) -> str:
    """The text of a completion: its tokens up to (not including) the first stop token, special tokens kept by
    default (a stray `<|im_start|>` is text outside the answer tags, which the inserter's parser must see)."""
    stops = set(stop_tokens)
    kept = []
    for token in token_ids:
        if int(token) in stops:
            break
        kept.append(int(token))
    return tokenizer.decode(kept, skip_special_tokens=skip_special_tokens)


@dataclasses.dataclass(frozen=True)
class BatchRewards:
    """Rewards of a batch of completions (the fields of the trainer's `RewardResult`).

    Attributes:
      total: the reward of each completion.  # [B*G]
      components: each reward component per completion, NaN where it does not apply.  # {name: [B*G]}
      counts: completions that did not parse, failed the format, or had no known gold anchors.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    counts: dict[str, int]


class RewardAdapter:
    """Scores completion token ids against their prompts' examples: the trainer's `reward_fn` for the inserter."""

    def __init__(self, tokenizer: Any, inserter: ml_collections.ConfigDict, stop_tokens: Sequence[int]):
        self.tokenizer = tokenizer
        self.inserter = inserter
        self.stop_tokens = tuple(stop_tokens)

    def __call__(self, examples: Sequence[InsertionExample], completions: Sequence[Sequence[int]]) -> BatchRewards:
        """Rewards of `completions` (prompt-major: the G completions of prompt b are rows b*G .. b*G+G-1).

        `examples` holds one example per prompt (B) or one per completion (B*G).
        """
        if not examples or len(completions) % len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples: expected a positive "
                             f"multiple (G completions per prompt, prompt-major)")
        per_example = len(completions) // len(examples)
        scored = [
            rewards_lib.score_completion(
                decode_completion(self.tokenizer, ids, self.stop_tokens), examples[row // per_example], self.inserter)
            for row, ids in enumerate(completions)
        ]
        names = [name for name in rewards_lib.COMPONENTS if any(name in r.components for r in scored)]
        return BatchRewards(
            total=np.asarray([r.total for r in scored], np.float32),
            components={name: np.asarray([r.components.get(name, np.nan) for r in scored], np.float32)
                        for name in names},
            counts={
                "parse_failed": sum(r.parse_failed for r in scored),
                "format_failed": sum(r.components[rewards_lib.FORMAT] == 0.0 for r in scored),
                "placement_unknown": sum(r.placement_unknown for r in scored),
            },
        )
