"""Output formats: render -> parse round trips, assembly into inline text, and malformed completions."""

import pytest

from m2io_jax.inserter import formats
from m2io_jax.inserter.formats import Placement

ANSWER = "Unplug the lamp first.  Open the shade.\nWipe the stem. Let it dry."
IDS = ("img1", "img2", "img3", "img4")


def _parse(completion, output_format="anchors", think=False):
    return formats.parse_completion(
        completion, output_format=output_format, think=think, answer=ANSWER, candidate_ids=IDS
    )


def _kinds(parsed):
    return [p.kind for p in parsed.problems]


def test_assemble_inline_places_markers_after_sentences_and_keeps_the_text():
    placements = [Placement("img3", 1), Placement("img1", -1), Placement("img2", 1), Placement("img4", 3)]
    assert formats.assemble_inline(ANSWER, placements) == (
        "<img1>Unplug the lamp first.  Open the shade.<img3><img2>\nWipe the stem. Let it dry.<img4>"
    )
    assert formats.assemble_inline(ANSWER, []) == ANSWER


def test_assemble_inline_rejects_a_sentence_out_of_range():
    with pytest.raises(ValueError, match=r"out of range \[-1, 4\)"):
        formats.assemble_inline(ANSWER, [Placement("img1", 4)])


@pytest.mark.parametrize("output_format, expected", [
    ("anchors", "<answer><img1>@0 <img3>@2 <img2>@2 <img4>@4</answer>"),
    ("inline", "<answer><img1>Unplug the lamp first.  Open the shade.<img3><img2>\nWipe the stem. "
               "Let it dry.<img4></answer>"),
])
def test_render_writes_the_format(output_format, expected):
    placements = [Placement("img3", 1), Placement("img1", -1), Placement("img2", 1), Placement("img4", 3)]
    assert formats.render_completion(ANSWER, placements, output_format=output_format) == expected


@pytest.mark.parametrize("output_format", formats.FORMATS)
@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("placements", [
    (),
    (Placement("img2", 0),),
    (Placement("img4", -1), Placement("img1", 2), Placement("img3", 2)),
])
def test_render_then_parse_round_trips(output_format, think, placements):
    completion = formats.render_completion(
        ANSWER, placements, output_format=output_format, think=think, reasoning="sentence 3 is about the stem"
    )
    parsed = _parse(completion, output_format, think)
    assert parsed.problems == () and parsed.well_formed and not parsed.parse_failed
    assert parsed.placements == placements
    assert parsed.inline_text == formats.assemble_inline(ANSWER, placements)
    assert parsed.reasoning == ("sentence 3 is about the stem" if think else None)


def test_no_image_answers():
    assert formats.render_completion(ANSWER, [], output_format="anchors") == "<answer></answer>"
    assert formats.render_completion(ANSWER, [], output_format="inline") == f"<answer>{ANSWER}</answer>"
    parsed = _parse("  <answer> </answer>\n")
    assert parsed.well_formed and parsed.placements == () and parsed.images == []


def test_anchors_parse_reports_images_in_inline_order():
    parsed = _parse("<answer><img2>@3 <img4>@1</answer>")
    assert parsed.placements == (Placement("img2", 2), Placement("img4", 0))
    assert parsed.images == ["img4", "img2"]


def test_inline_parse_places_mid_text_markers_after_the_sentence_they_follow():
    parsed = _parse("<answer>Unplug the lamp first.<img2> Open the shade. Wipe <img3>the stem. Let it dry.</answer>",
                    "inline")
    assert parsed.placements == (Placement("img2", 0), Placement("img3", 2))
    assert parsed.well_formed


@pytest.mark.parametrize("completion, kinds", [
    ("I would put image 2 after the first sentence.", ["missing_answer", "bad_tags", "bad_tags"]),
    ("<answer><img1>@1", ["missing_answer", "bad_tags"]),
    ("<img1>@1</answer>", ["missing_answer", "bad_tags"]),
    ("<answer><img1>@1</answer> and more", ["text_outside_tags"]),
    ("<answer><img1>@1</answer><answer><img2>@2</answer>", ["bad_tags", "bad_tags"]),
    ("<answer><img1>@1, <img2>@2</answer>", ["malformed_item"]),
    ("<answer>img1 after sentence 1</answer>", ["malformed_item"] * 4),
    ("<think>hm</think><answer><img1>@1</answer>", ["bad_tags", "bad_tags"]),
])
def test_structure_problems_fail_the_parse(completion, kinds):
    parsed = _parse(completion)
    assert _kinds(parsed) == kinds
    assert parsed.parse_failed and not parsed.well_formed


def test_think_required_but_missing_or_after_the_answer():
    assert _kinds(_parse("<answer><img1>@1</answer>", think=True)) == ["bad_tags", "bad_tags"]
    late = _parse("<answer><img1>@1</answer><think>x</think>", think=True)
    assert _kinds(late) == ["bad_tags"] and late.parse_failed


@pytest.mark.parametrize("output_format, completion, kinds, placements", [
    ("anchors", "<answer><img9>@1 <img2>@2</answer>", ["unknown_id"], (Placement("img9", 0), Placement("img2", 1))),
    ("anchors", "<answer><img2>@1 <img2>@3</answer>", ["duplicate_id"], (Placement("img2", 0), Placement("img2", 2))),
    ("anchors", "<answer><img2>@5 <img1>@4</answer>", ["sentence_out_of_range"], (Placement("img1", 3),)),
    ("inline", "<answer>Unplug the lamp first.<img5> Open the shade.<img5>\nWipe the stem. Let it dry.</answer>",
     ["unknown_id", "duplicate_id"], (Placement("img5", 0), Placement("img5", 1))),
])
def test_validity_problems_fail_the_format_but_keep_the_placements(output_format, completion, kinds, placements):
    parsed = _parse(completion, output_format)
    assert _kinds(parsed) == kinds
    assert not parsed.parse_failed and not parsed.well_formed
    assert parsed.placements == placements


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="'json'"):
        formats.render_completion(ANSWER, [], output_format="json")
    with pytest.raises(ValueError, match="'json'"):
        _parse("<answer></answer>", "json")


def test_anchor_numbers_are_one_based():
    assert formats.anchor_number(-1) == 0 and formats.anchor_number(0) == 1 and formats.anchor_number(4) == 5
