"""The LLM judge: prompts, tag parsing, unparsable replies, aggregation, and an end-to-end run of a tiny
randomly initialised Qwen2 through the sampler (its scores mean nothing)."""

import pytest

from m2io_jax.data import mramg
from m2io_jax.eval import config as eval_config
from m2io_jax.eval import judge as judge_lib

DOCUMENT = mramg.Document("7", "Mix the flour. <PIC> Bake it for ten minutes.<PIC> Serve warm.", ("mix", "bake"),
                          "tiny")
CAPTIONS = {"mix": "flour in a bowl", "bake": "a tray in the oven"}


def _items():
    contexts = judge_lib.image_contexts({"7": DOCUMENT})
    with_images = judge_lib.judge_item("q1", "How to bake?", "Mix.<img2> Bake.<img1>", ["mix", "bake"],
                                       CAPTIONS, contexts)
    no_image = judge_lib.judge_item("q2", "When?", "In the morning.", [], CAPTIONS, contexts)
    return [with_images, no_image]


def test_image_context_and_position_markers():
    contexts = judge_lib.image_contexts({"7": DOCUMENT})
    assert contexts == {"mix": ("Mix the flour.", "Bake it for ten minutes."),
                        "bake": ("Bake it for ten minutes.", "Serve warm.")}
    item = _items()[0]
    assert item.answer == "Mix.<img_1> Bake.<img_2>"  # numbered by position, whatever the candidate ids
    assert [(i.marker, i.name, i.caption) for i in item.images] == [("<img_1>", "mix", "flour in a bowl"),
                                                                   ("<img_2>", "bake", "a tray in the oven")]
    with pytest.raises(ValueError, match="question q3: the answer has 1 <imgN> markers but 2 image names"):
        judge_lib.judge_item("q3", "?", "A.<img1>", ["mix", "bake"], CAPTIONS, contexts)


def test_requests_cover_each_rubric_once_per_unit():
    items = _items()
    requests = judge_lib.build_requests(items)
    kinds = [(r.item, r.rubric, r.image) for r in requests]
    assert kinds == [(0, "relevance", 0), (0, "relevance", 1), (0, "effectiveness", 0), (0, "effectiveness", 1),
                     (0, "position", None), (0, "overall", None), (1, "overall", None)]
    relevance = requests[1].prompt
    assert "Query: How to bake?" in relevance and "Answer: Mix.<img_1> Bake.<img_2>" in relevance
    assert "<img_2> caption: a tray in the oven" in relevance and "flour in a bowl" not in relevance
    assert "[context_above] Bake it for ten minutes. <img_2> [context_below] Serve warm." in relevance
    assert relevance.endswith("<relevance_score>N</relevance_score>.")
    assert "<effective_score>N</effective_score>" in requests[2].prompt
    assert requests[4].prompt.endswith("<img_1_score>0 or 1</img_1_score>\n<img_2_score>0 or 1</img_2_score>")
    assert "(no image)" in requests[6].prompt and "<overall_quality_score>N" in requests[6].prompt


@pytest.mark.parametrize("reply, expected", [
    ("Good image. <relevance_score>4</relevance_score>", 0.8),
    ("<relevance_score> 5 </relevance_score> and later <relevance_score>1</relevance_score>", 1.0),  # first tag
    ("<relevance_score>6</relevance_score>", None),  # out of range
    ("<relevance_score>0</relevance_score>", None),
    ("<relevance_score>four</relevance_score>", None),
    ("<effective_score>4</effective_score>", None),  # another rubric's tag
    ("", None),
])
def test_parse_scale(reply, expected):
    assert judge_lib.parse_scale(reply, "relevance") == expected


def test_parse_positions():
    reply = "<img_1_score>1</img_1_score>\n<img_2_score>0</img_2_score> <img_3_score>2</img_3_score>"
    assert judge_lib.parse_positions(reply, 4) == [1.0, 0.0, None, None]


def test_scores_normalise_count_unparsable_and_aggregate():
    items = _items()
    requests = judge_lib.build_requests(items)
    replies = ["<relevance_score>5</relevance_score>", "no tag at all",        # relevance 1.0, 0 (unparsable)
               "<effective_score>3</effective_score>", "<effective_score>4</effective_score>",
               "<img_1_score>1</img_1_score>",                                 # image 2 missing: 0, unparsable
               "<overall_quality_score>2</overall_quality_score>",
               "<overall_quality_score>5</overall_quality_score>"]
    first, second = judge_lib.score_replies(items, requests, replies)
    assert first.relevance == pytest.approx(0.5) and first.effectiveness == pytest.approx(0.7)
    assert first.position == pytest.approx(0.5) and first.overall == pytest.approx(0.4)
    assert first.unparsable == {"relevance": 1, "effectiveness": 0, "position": 1, "overall": 0}
    assert (second.relevance, second.effectiveness, second.position) == (None, None, None)
    assert second.overall == pytest.approx(1.0)
    table = judge_lib.aggregate([first, second])
    assert table["relevance"] == pytest.approx(50.0)  # the image-less answer is left out
    assert table["overall"] == pytest.approx(70.0)
    assert (table["questions"], table["no_image"]) == (2, 1)
    assert (table["unparsable/relevance"], table["unparsable/position"], table["unparsable/overall"]) == (1, 1, 0)
    with pytest.raises(ValueError, match="6 replies for 7 judge requests"):
        judge_lib.score_replies(items, requests, replies[:6])


def test_chat_prompt_falls_back_to_chatml():
    class NoTemplate:
        chat_template = None

    text = judge_lib.chat_prompt(NoTemplate(), "Rate this.")
    assert text.startswith("<|im_start|>system\n") and text.endswith("Rate this.<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_qwen2_judge_end_to_end(tmp_path):
    from m2io_jax.models import tiny

    items = _items()
    requests = judge_lib.build_requests(items)
    texts = [judge_lib.chat_prompt(type("T", (), {"chat_template": None})(), r.prompt) for r in requests]
    path = tiny.build_tiny_checkpoint(tmp_path / "judge", texts * 4, kind="qwen2", vocab_size=400)
    config = eval_config.get_config().judge
    config.max_new_tokens = 8
    config.batch_size = 4
    judge = judge_lib.Judge.from_pretrained(path, config)

    replies = judge.replies([r.prompt for r in requests])
    assert len(replies) == len(requests) and all(isinstance(r, str) for r in replies)
    scores = judge.score(items)
    assert scores == judge_lib.score_replies(items, requests, replies)  # greedy: the same replies again
    expected_units = {"relevance": 2, "effectiveness": 2, "position": 2, "overall": 1}
    for rubric, units in expected_units.items():
        parsed = [judge_lib.parse_positions(r, 2) if q.rubric == "position" else [judge_lib.parse_scale(r, rubric)]
                  for q, r in zip(requests, replies) if q.item == 0 and q.rubric == rubric]
        assert sum(len(p) for p in parsed) == units
        assert scores[0].unparsable[rubric] == sum(v is None for p in parsed for v in p)
    assert all(0.0 <= v <= 1.0 for v in (scores[0].relevance, scores[0].position, scores[1].overall))
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        judge_lib.Judge.from_pretrained(str(tmp_path / "missing"), config)
