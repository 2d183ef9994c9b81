"""Rewards: each component against values computed by hand, gating, renormalisation, counts."""

import pytest

from m2io_jax.inserter import rewards
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.config import get_inserter_config
from m2io_jax.inserter.example import InsertionExample
from m2io_jax.inserter.formats import Placement

ANSWER = "Alpha one. Beta two. Gamma three. Delta four."


def _example(gold=("img2", "img3"), anchors=(Placement("img2", 0), Placement("img3", 2))):
    candidates = Candidates(
        question_id="q1", dataset="x", chunks=(), contexts=(),
        image_map={f"img{i}": f"name{i}" for i in range(1, 5)}, captions=("a", "b", "c", "d"),
        gold=gold, gold_missing=(), added_gold=(),
    )
    return InsertionExample("What?", ANSWER, candidates, anchors)


def _config(output_format="anchors", **rewards_overrides):
    config = get_inserter_config()
    config.output_format = output_format
    config.rewards.update(rewards_overrides)
    return config


def test_perfect_anchors_completion_scores_one():
    reward = rewards.score_completion("<answer><img2>@1 <img3>@3</answer>", _example(), _config())
    assert reward.components == {"format": 1.0, "selection": 1.0, "order": 1.0, "placement": 1.0}
    assert reward.total == 1.0 and not reward.parse_failed and not reward.placement_unknown


# Inline order [img3, img2, img4] against gold [img2, img3]: P = 2/3, R = 1, F1 = 0.8; weighted edit distance 3
# (delete img3: 2, keep img2, substitute img4 -> img3: 1), normalised by max(2, 3) -> ordering 1 - 1/3.
# Placement: img3 after sentence 1 (anchor 2, within one), img2 after sentence 3 (anchor 0, not): 1/2.
PARTIAL = "<answer><img3>@2 <img2>@4 <img4>@4</answer>"


def test_each_component_by_hand():
    reward = rewards.score_completion(PARTIAL, _example(), _config())
    assert reward.components == pytest.approx({"format": 1.0, "selection": 0.8, "order": 2 / 3, "placement": 0.5})
    assert reward.total == pytest.approx((1 + 0.8 + 2 / 3 + 0.5) / 4)


def test_weights_give_a_weighted_mean():
    config = _config()
    config.rewards.weights.format = 3.0
    reward = rewards.score_completion(PARTIAL, _example(), config)
    assert reward.total == pytest.approx((3 + 0.8 + 2 / 3 + 0.5) / 6)


def test_unknown_anchors_leave_placement_out_and_renormalise():
    reward = rewards.score_completion(PARTIAL, _example(anchors=None), _config())
    assert "placement" not in reward.components and reward.placement_unknown
    assert reward.total == pytest.approx((1 + 0.8 + 2 / 3) / 3)


# img9 is not a candidate: format fails. Ungated: F1 of {img2, img9} vs {img2, img3} = 0.5; ordering: rf = 1/2,
# distance 1 (substitute img9 -> img3) over max(2, 2) -> 0.5 * (1 - 0.5 / 3) = 5/12; img2 sits on its anchor.
UNKNOWN_ID = "<answer><img2>@1 <img9>@3</answer>"


def test_gating_zeroes_content_when_the_format_fails():
    reward = rewards.score_completion(UNKNOWN_ID, _example(), _config())
    assert reward.components == {"format": 0.0, "selection": 0.0, "order": 0.0, "placement": 0.0}
    assert reward.total == 0.0 and not reward.parse_failed
    assert [p.kind for p in reward.problems] == ["unknown_id"]


def test_without_gating_content_is_scored_on_what_parsed():
    reward = rewards.score_completion(UNKNOWN_ID, _example(), _config(gate_on_format=False))
    assert reward.components == pytest.approx({"format": 0.0, "selection": 0.5, "order": 5 / 12, "placement": 1.0})
    assert reward.total == pytest.approx((0.5 + 5 / 12 + 1.0) / 4)


@pytest.mark.parametrize("gate", [True, False])
def test_unparsable_completion_scores_zero_and_is_flagged(gate):
    reward = rewards.score_completion("Image two goes first.", _example(), _config(gate_on_format=gate))
    assert reward.parse_failed and reward.components["format"] == 0.0 and reward.total == 0.0


def test_inline_text_preservation():
    config = _config("inline")
    kept = rewards.score_completion(
        "<answer>Alpha one.<img2> Beta two. Gamma three.<img3>  Delta four.</answer>", _example(), config)
    assert kept.components == {"format": 1.0, "selection": 1.0, "order": 1.0, "placement": 1.0, "text": 1.0}
    changed = rewards.score_completion(
        "<answer>Alpha one.<img2> Beta two. Gamma three.<img3> Delta 4.</answer>", _example(), config)
    assert changed.components["text"] == 0.0 and changed.total == pytest.approx(4 / 5)


def test_no_gold_image_question():
    example = _example(gold=(), anchors=())
    empty = rewards.score_completion("<answer></answer>", example, _config())
    assert empty.total == 1.0 and not empty.placement_unknown
    one = rewards.score_completion("<answer><img1>@1</answer>", example, _config())
    assert one.components == {"format": 1.0, "selection": 0.0, "order": 0.0, "placement": 0.0}


@pytest.mark.parametrize("placements, tolerance, expected", [
    ([Placement("img2", 2), Placement("img3", 2)], 1, 0.5),  # img2 two sentences from its anchor
    ([Placement("img2", 2), Placement("img3", 2)], 2, 1.0),
    ([Placement("img2", 0), Placement("img2", 3), Placement("img1", 3)], 1, 1.0),  # first placement counts
    ([Placement("img1", 0), Placement("img4", 2)], 1, 0.0),  # no gold image chosen
    ([], 1, 0.0),
])
def test_placement_reward(placements, tolerance, expected):
    gold = [Placement("img2", 0), Placement("img3", 2)]
    assert rewards.placement_reward(placements, gold, tolerance=tolerance) == expected


def test_text_reward_ignores_placeholders_and_whitespace_runs():
    assert rewards.text_reward("Alpha one.<img2>  Beta two.\n", "Alpha one. Beta two.") == 1.0
    assert rewards.text_reward("Alpha one.<img2> Beta two", "Alpha one. Beta two.") == 0.0


def test_zero_weights_are_rejected():
    config = _config()
    for name in ("format", "selection", "order", "placement"):
        config.rewards.weights[name] = 0.0
    with pytest.raises(ValueError, match="sum to 0.0"):
        rewards.score_completion(PARTIAL, _example(), config)


def test_summarize_counts_and_means():
    config = _config()
    batch = [
        rewards.score_completion("<answer><img2>@1 <img3>@3</answer>", _example(), config),
        rewards.score_completion(PARTIAL, _example(anchors=None), config),
        rewards.score_completion("garbage", _example(), config),
    ]
    summary = rewards.summarize(batch)
    assert summary["reward/mean"] == pytest.approx((1 + (1 + 0.8 + 2 / 3) / 3 + 0) / 3)
    assert summary["reward/placement"] == pytest.approx(0.5)  # over the two with known anchors: 1 and 0
    assert summary["reward/selection"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert "reward/text" not in summary
    assert summary["count/parse_failed"] == 1 and summary["count/format_failed"] == 1
    assert summary["count/placement_unknown"] == 1
