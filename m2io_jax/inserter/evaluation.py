"""Held-out evaluation of the inserter: greedy completions on the gold answer text, MRAMG metrics and placement.

Run on the validation split during and after training (the test split is kept for reporting). Each example's
prompt shows the gold answer with its images removed; the inserter's greedy completion (`sampling.generate`,
temperature 0) is parsed in the configured format and scored with the one definition of each metric:

  image_precision, image_recall, image_f1   `metrics.image_scores` of the placed images against the gold ids
  ordering                                  `metrics.ordering_score` (MRAMG image ordering)
  placement_accuracy                        over the gold images of examples whose gold anchors are known: the
                                            share placed within `rewards.placement_tolerance` sentences of
                                            their anchor (first placement of each image counts)
  format_ok, parse_failed                   shares of completions that pass the format reward / do not parse
  reward                                    mean total reward (`rewards.score_completion`)

Every metric is a mean over examples in [0, 1] (placement_accuracy: over gold images); `examples` is their
number and `placement_gold_images` the denominator of placement_accuracy.

The `rule` baseline (`inserter.baselines`) is scored the same way: its placements are rendered in the configured
format and go through the same parser and metrics; `choose_rule_threshold` picks its similarity threshold on the
examples given (the validation split) by mean reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections

from m2io_jax import sampling
from m2io_jax.eval import metrics
from m2io_jax.inserter import baselines, formats
from m2io_jax.inserter import rewards as rewards_lib
from m2io_jax.inserter.pipeline import PromptExample
from m2io_jax.inserter.task import decode_completion

RULE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(-2, 19))  # cosine -0.1 .. 0.9: the search grid
METRICS = ("image_precision", "image_recall", "image_f1", "ordering", "placement_accuracy", "format_ok",
           "parse_failed", "reward", "examples", "placement_gold_images")


def greedy_completions(model: Any, examples: Sequence[PromptExample], *, max_new_tokens: int, batch_size: int,
                       stop_tokens: Sequence[int], suppress_tokens: Sequence[int] = (),
                       buckets: sampling.Buckets | None = None) -> list[list[int]]:
    """The greedy completion token ids of each example, `batch_size` prompts per `sampling.generate` call;
    `suppress_tokens` (e.g. `<|image_pad|>`) are never emitted, as in the trainer's rollouts."""
    out: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        sampled = sampling.generate(
            model, [list(e.prompt_ids) for e in chunk], images=[e.images for e in chunk],
            max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop_tokens, suppress_tokens=suppress_tokens,
            buckets=buckets)
        out.extend(sampled.tokens)
    return out


def placement_hits(placements: Sequence[formats.Placement], gold_anchors: Sequence[formats.Placement],
                   tolerance: int) -> int:
    """How many gold images are placed (first placement of each) within `tolerance` sentences of their anchor."""
    first: dict[str, int] = {}
    for placement in placements:
        first.setdefault(placement.image, placement.sentence)
    return sum(gold.image in first and abs(first[gold.image] - gold.sentence) <= tolerance for gold in gold_anchors)


def score_completions(completions: Sequence[str], examples: Sequence[PromptExample],
                      inserter: ml_collections.ConfigDict) -> dict[str, float]:
    """The `METRICS` of decoded `completions` (one per example) under the inserter config."""
    if len(completions) != len(examples) or not examples:
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples: expected one per example, "
                         f"at least one")
    sums = dict.fromkeys(METRICS, 0.0)
    for text, prepared in zip(completions, examples):
        example = prepared.example
        parsed = formats.parse_completion(text, output_format=inserter.output_format, think=inserter.think,
                                          answer=example.answer, candidate_ids=example.candidate_ids)
        precision, recall, f1 = metrics.image_scores(example.gold, parsed.images)
        sums["image_precision"] += precision
        sums["image_recall"] += recall
        sums["image_f1"] += f1
        sums["ordering"] += metrics.ordering_score(example.gold, parsed.images)
        sums["format_ok"] += parsed.well_formed
        sums["parse_failed"] += parsed.parse_failed
        sums["reward"] += rewards_lib.score_completion(text, example, inserter).total
        if example.gold_anchors is not None:
            sums["placement_accuracy"] += placement_hits(parsed.placements, example.gold_anchors,
                                                         inserter.rewards.placement_tolerance)
            sums["placement_gold_images"] += len(example.gold_anchors)
    n = len(examples)
    out = {name: sums[name] / n for name in METRICS if name not in ("placement_accuracy", "placement_gold_images")}
    gold_images = sums["placement_gold_images"]
    out["placement_accuracy"] = sums["placement_accuracy"] / gold_images if gold_images else math.nan
    out["placement_gold_images"] = gold_images
    out["examples"] = float(n)
    return {name: out[name] for name in METRICS}


def evaluate(model: Any, examples: Sequence[PromptExample], *, tokenizer: Any, inserter: ml_collections.ConfigDict,
             max_new_tokens: int, batch_size: int, stop_tokens: Sequence[int], suppress_tokens: Sequence[int] = (),
             buckets: sampling.Buckets | None = None) -> dict[str, float]:
    """{metric: value} (`METRICS`) of `model`'s greedy completions on `examples` (the validation split's)."""
    completions = greedy_completions(model, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     stop_tokens=stop_tokens, suppress_tokens=suppress_tokens, buckets=buckets)
    texts = [decode_completion(tokenizer, ids, stop_tokens) for ids in completions]
    return score_completions(texts, examples, inserter)


def rule_completions(examples: Sequence[PromptExample], encoder: baselines.SentenceEncoder, *, threshold: float,
                     inserter: ml_collections.ConfigDict) -> list[str]:
    """The rule baseline's placements of each example rendered as a completion in the configured format."""
    return [formats.render_completion(e.example.answer, baselines.rule_placements(e.example, encoder,
                                                                                  threshold=threshold),
                                      output_format=inserter.output_format, think=inserter.think)
            for e in examples]


def choose_rule_threshold(examples: Sequence[PromptExample], encoder: baselines.SentenceEncoder,
                          inserter: ml_collections.ConfigDict,
                          thresholds: Sequence[float] = RULE_THRESHOLDS) -> tuple[float, dict[str, float]]:
    """The threshold of `thresholds` whose rule baseline has the highest mean reward on `examples` (the lowest
    threshold on ties), with its `METRICS`."""
    if not thresholds:
        raise ValueError("choose_rule_threshold needs at least one threshold")
    best: tuple[float, dict[str, float]] | None = None
    for threshold in sorted(thresholds):
        scores = score_completions(rule_completions(examples, encoder, threshold=threshold, inserter=inserter),
                                   examples, inserter)
        if best is None or scores["reward"] > best[1]["reward"]:
            best = (float(threshold), scores)
    return best
