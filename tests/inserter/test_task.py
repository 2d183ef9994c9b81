"""Reward adapter: completion token ids of hand-written completions get the rewards computed by hand."""

import math

import numpy as np
import pytest

from m2io_jax.inserter import pipeline, task
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.config import get_inserter_config
from m2io_jax.inserter.example import InsertionExample
from m2io_jax.inserter.formats import Placement
from tests.inserter.demo_setup import demo_setup

ANSWER = "Alpha one. Beta two. Gamma three."


def _example(anchors=(Placement("img2", 0), Placement("img1", 2))):
    candidates = Candidates(question_id="q", dataset="x", chunks=(), contexts=(),
                            image_map={"img1": "a", "img2": "b", "img3": "c"}, captions=("a", "b", "c"),
                            gold=("img2", "img1"), gold_missing=(), added_gold=())
    return InsertionExample("What?", ANSWER, candidates, anchors)


@pytest.fixture(scope="module")
def tokenizer():
    return demo_setup().processor.tokenizer


def _ids(tokenizer, text, stop):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [stop]


def test_hand_written_completions_get_the_expected_rewards(tokenizer):
    stops = pipeline.stop_token_ids(tokenizer)
    adapter = task.RewardAdapter(tokenizer, get_inserter_config(), stops)
    # Second completion: P 1, R 1/2 -> F1 2/3; ordering: rf 1/2, inserting img1 costs 3 over max(2, 1) images,
    # so 1/2 * (1 - (3/2)/3) = 1/4.
    completions = [
        _ids(tokenizer, "<answer><img2>@1 <img1>@3</answer>", stops[0]),  # gold: every component 1
        _ids(tokenizer, "<answer><img2>@1</answer>", stops[1]),
        _ids(tokenizer, "<answer><img2>@1", stops[0]),  # no closing tag: parse fails, gated to 0
        _ids(tokenizer, "<answer></answer>", stops[0]) + [7, 7],  # tokens after the stop token are ignored
    ]
    result = adapter([_example(), _example(anchors=None)], completions)
    np.testing.assert_allclose(result.total[:3], [1.0, (1 + 2 / 3 + 1 / 4 + 1) / 4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(result.components["selection"], [1.0, 2 / 3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(result.components["order"], [1.0, 1 / 4, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(result.components["format"], [1.0, 1.0, 0.0, 1.0])
    placement = result.components["placement"]
    assert placement[:2].tolist() == [1.0, 1.0] and math.isnan(placement[2]) and math.isnan(placement[3])
    assert "text" not in result.components  # anchors format: text preservation applies to no completion
    assert result.counts == {"parse_failed": 1, "format_failed": 1, "placement_unknown": 2}
    assert result.total[3] == pytest.approx(1 / 3)  # format 1, selection 0, order 0 (no placement weight)


def test_completions_must_be_a_multiple_of_the_examples(tokenizer):
    adapter = task.RewardAdapter(tokenizer, get_inserter_config(), pipeline.stop_token_ids(tokenizer))
    with pytest.raises(ValueError, match="3 completions for 2 examples"):
        adapter([_example(), _example()], [[1], [2], [3]])


def test_decode_stops_at_the_first_stop_token_and_keeps_special_tokens(tokenizer):
    stops = pipeline.stop_token_ids(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = [start] + tokenizer("<answer></answer>", add_special_tokens=False)["input_ids"] + [stops[1], start]
    assert task.decode_completion(tokenizer, ids, stops) == "<|im_start|><answer></answer>"
