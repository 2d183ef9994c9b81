"""Held-out evaluation: every metric from a tiny model's greedy completions, and hand-checked scores of known
completions (gold placements score 1, an empty answer scores the no-image values)."""

import math

import numpy as np
import pytest

from m2io_jax import models
from m2io_jax.inserter import evaluation, formats, pipeline
from tests.inserter.demo_setup import demo_setup


@pytest.fixture(scope="module")
def validation():
    setup = demo_setup()
    examples, _ = setup.examples("validation")
    return setup, examples


def test_tiny_model_evaluation_returns_every_metric(validation):
    setup, examples = validation
    model = models.from_pretrained(setup.checkpoint)
    tokenizer = setup.processor.tokenizer
    result = evaluation.evaluate(model, examples[:4], tokenizer=tokenizer, inserter=setup.config.inserter,
                                 max_new_tokens=8, batch_size=4, stop_tokens=pipeline.stop_token_ids(tokenizer),
                                 suppress_tokens=[tokenizer.convert_tokens_to_ids("<|image_pad|>")])
    assert list(result) == list(evaluation.METRICS)
    assert result["examples"] == 4.0
    for name, value in result.items():
        assert math.isfinite(value), name
        if name not in ("examples", "placement_gold_images"):
            assert 0.0 <= value <= 1.0, (name, value)


def test_gold_completions_score_one_and_empty_answers_score_no_image(validation):
    setup, examples = validation
    inserter = setup.config.inserter
    with_gold = [e for e in examples if e.example.gold][:3]
    gold = [formats.render_completion(e.example.answer, e.example.gold_anchors, output_format=inserter.output_format)
            for e in with_gold]
    scores = evaluation.score_completions(gold, with_gold, inserter)
    for name in ("image_precision", "image_recall", "image_f1", "ordering", "placement_accuracy", "format_ok",
                 "reward"):
        assert scores[name] == pytest.approx(1.0), name
    assert scores["parse_failed"] == 0.0
    assert scores["placement_gold_images"] == sum(len(e.example.gold_anchors) for e in with_gold)

    empty = evaluation.score_completions(["<answer></answer>", "no tags"], with_gold[:2], inserter)
    assert empty["image_f1"] == empty["placement_accuracy"] == 0.0
    assert empty["format_ok"] == empty["parse_failed"] == 0.5


def test_placement_counts_first_placement_within_tolerance():
    gold = [formats.Placement("img1", 0), formats.Placement("img2", 3)]
    placed = [formats.Placement("img1", 1), formats.Placement("img2", 0), formats.Placement("img2", 3)]
    assert evaluation.placement_hits(placed, gold, tolerance=1) == 1
    assert evaluation.placement_hits(placed, gold, tolerance=0) == 0


class _Orthogonal:
    """Every text orthogonal to every other: each caption's best similarity is exactly 0."""

    def encode(self, texts):
        return np.eye(len(texts), dtype=np.float32)


def test_rule_threshold_is_chosen_by_validation_reward(validation):
    setup, examples = validation
    inserter = setup.config.inserter
    # Similarity 0 everywhere: a negative threshold keeps every candidate, a threshold >= 0 keeps none, so the
    # choice is between exactly these two sets of completions.
    keep_all = evaluation.rule_completions(examples, _Orthogonal(), threshold=-0.05, inserter=inserter)
    keep_none = evaluation.rule_completions(examples, _Orthogonal(), threshold=0.0, inserter=inserter)
    assert all(c == "<answer></answer>" for c in keep_none)
    assert all(c != "<answer></answer>" for c, e in zip(keep_all, examples) if e.example.candidate_ids)
    all_reward = evaluation.score_completions(keep_all, examples, inserter)["reward"]
    none_reward = evaluation.score_completions(keep_none, examples, inserter)["reward"]
    assert all_reward != none_reward
    threshold, scores = evaluation.choose_rule_threshold(examples, _Orthogonal(), inserter,
                                                         thresholds=(0.3, -0.05, 0.0, -0.1))
    assert threshold == (-0.1 if all_reward > none_reward else 0.0)  # the lowest of the tied winners
    assert scores["reward"] == max(all_reward, none_reward)
