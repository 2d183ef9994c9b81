"""Pipeline: exact example counts per split, the prompt budget (truncation and skipping counted), disjoint
per-process shards, seeded order, and SFT targets that parse back to the gold placements."""

import itertools

import numpy as np
import pytest

from m2io_jax.inserter import formats, pipeline
from tests.inserter.demo_setup import QUESTIONS, demo_setup


@pytest.fixture(scope="module")
def setup():
    return demo_setup()


@pytest.fixture(scope="module")
def train_examples(setup):
    return setup.examples("train")


def test_every_question_of_each_split_becomes_one_example(setup, train_examples):
    examples, counts = train_examples
    validation, validation_counts = setup.examples("validation")
    assert counts["questions"] == counts["examples"] == len(examples) == QUESTIONS["train"]
    assert validation_counts["questions"] == validation_counts["examples"] == QUESTIONS["validation"]
    assert counts["over_budget"] == counts["truncated"] == counts["dropped_candidates"] == 0
    train_ids = {e.example.candidates.question_id for e in examples}
    assert len(train_ids) == QUESTIONS["train"]
    assert not train_ids & {e.example.candidates.question_id for e in validation}
    # Missed gold is added to training examples only: train keeps every gold image the cap allows.
    assert counts["gold_missing"] == 0 < validation_counts["gold_missing"]


def test_prompt_holds_one_image_pad_run_per_candidate(setup, train_examples):
    examples, _ = train_examples
    pad = setup.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for e in examples[:5]:
        ids = np.asarray(e.prompt_ids)
        grid = e.images["image_grid_thw"]
        assert grid.shape == (len(e.example.candidate_ids), 3)
        assert (ids == pad).sum() == int(np.prod(grid, axis=1).sum()) // 4  # 2x2 merge


def test_over_budget_prompts_drop_lowest_ranked_candidates_and_are_counted(setup, train_examples):
    examples, _ = train_examples
    lengths = np.asarray([len(e.prompt_ids) for e in examples])
    budget = int(np.sort(lengths)[-5]) - 1  # the 5 longest prompts do not fit
    over = int((lengths > budget).sum())
    truncated, counts = setup.examples("train", max_prompt_tokens=budget)
    assert counts["truncated"] == over and counts["over_budget"] == 0 and counts["examples"] == QUESTIONS["train"]
    before = {e.example.candidates.question_id: e for e in examples}
    dropped = 0
    for e in truncated:
        assert len(e.prompt_ids) <= budget
        original = before[e.example.candidates.question_id]
        lost = len(original.example.candidate_ids) - len(e.example.candidate_ids)
        assert lost == e.dropped_candidates
        dropped += lost
        kept = set(e.example.candidates.image_map.values())
        assert kept <= set(original.example.candidates.image_map.values())
    assert counts["dropped_candidates"] == dropped >= over

    skipped, skip_counts = setup.examples("train", max_prompt_tokens=budget, over_budget="skip")
    assert skip_counts["over_budget"] == over and skip_counts["truncated"] == 0
    assert len(skipped) == skip_counts["examples"] == QUESTIONS["train"] - over


def test_unknown_over_budget_policy_is_named(setup):
    with pytest.raises(ValueError, match="over_budget='truncate'"):
        setup.examples("train", over_budget="truncate")


def test_an_epoch_covers_the_split_once(train_examples):
    examples, _ = train_examples
    epoch = len(examples) // 4
    stream = pipeline.batches(examples, batch_size=4, seed=3)
    ids = [e.example.candidates.question_id for batch in itertools.islice(stream, epoch) for e in batch]
    assert len(ids) == len(set(ids)) == epoch * 4
    assert set(ids) <= {e.example.candidates.question_id for e in examples}


def test_batch_order_is_fixed_by_the_seed_and_reshuffled_each_epoch(train_examples):
    examples, _ = train_examples

    def order(seed, count):
        stream = pipeline.batches(examples, batch_size=8, seed=seed)
        return [e.example.candidates.question_id for batch in itertools.islice(stream, count) for e in batch]

    epoch = len(examples) // 8
    first = order(0, 2 * epoch)
    assert first == order(0, 2 * epoch)
    assert first[:8] != order(1, 1)
    one, two = first[:len(examples)], first[len(examples):]
    assert sorted(one) == sorted(two) and one != two
    with pytest.raises(ValueError, match="fewer than batch_size"):
        pipeline.batches(examples[:3], batch_size=4, seed=0)


def test_sft_targets_parse_back_to_the_gold_placements(setup, train_examples):
    examples, counts = train_examples
    tokenizer = setup.processor.tokenizer
    end_of_turn = pipeline.stop_token_ids(tokenizer)[0]
    inserter = setup.config.inserter
    with_images = 0
    for e in examples:
        assert e.target_ids[-1] == end_of_turn
        text = tokenizer.decode(list(e.target_ids[:-1]))
        parsed = formats.parse_completion(text, output_format=inserter.output_format, think=inserter.think,
                                          answer=e.example.answer, candidate_ids=e.example.candidate_ids)
        assert parsed.well_formed, (text, parsed.problems)
        gold = sorted(e.example.gold_anchors, key=lambda p: (p.sentence, p.image))
        assert sorted(parsed.placements, key=lambda p: (p.sentence, p.image)) == gold
        with_images += bool(gold)
    assert counts["no_sft_target"] == 0 and with_images > QUESTIONS["train"] // 2
