"""MRAMG statistical metrics against every worked example of reference/m2io-and-mramg.md section 5.4."""

import pytest

from m2io_jax.eval import metrics

# (gold A, predicted B, (P, R, F1), dist or None, ordering), exactly the reference table.
WORKED_EXAMPLES = [
    ("a b c", "a b c", (1, 1, 1), 0, 1.000),
    ("a b c", "b a c", (1, 1, 1), 2, 0.778),
    ("a b", "b a", (1, 1, 1), 2, 0.667),
    ("a b c", "a b", (1, 0.667, 0.8), 3, 0.444),
    ("a b c", "a b c d", (0.75, 1, 0.857), 2, 0.833),
    ("a", "b", (0, 0, 0), None, 0.0),
    ("a", "", (0, 0, 0), None, 0.0),
    ("", "a", (0, 1, 0), None, 0.0),
]


@pytest.mark.parametrize("gold,pred,prf,dist,ordering", WORKED_EXAMPLES)
def test_worked_examples(gold, pred, prf, dist, ordering):
    a, b = gold.split(), pred.split()
    assert metrics.image_scores(a, b) == pytest.approx(prf, abs=5e-4)
    if dist is not None:
        assert metrics.weighted_edit_distance(a, b) == dist
    assert metrics.ordering_score(a, b) == pytest.approx(ordering, abs=5e-4)


def test_both_empty_is_perfect():
    assert metrics.image_scores([], []) == (1.0, 1.0, 1.0)
    assert metrics.ordering_score([], []) == 1.0


def test_empty_prediction_and_empty_gold():
    assert metrics.image_scores(["a", "b"], []) == (0.0, 0.0, 0.0)
    assert metrics.image_scores([], ["a", "b"]) == (0.0, 1.0, 0.0)
    assert metrics.ordering_score([], ["a"]) == 0.0
    assert metrics.ordering_score(["a"], []) == 0.0


def test_image_scores_use_sets():
    # A duplicated prediction counts once for P/R/F1, but the ordering score sees the sequence.
    assert metrics.image_scores(["a", "b"], ["a", "a", "b"]) == (1.0, 1.0, 1.0)
    assert metrics.ordering_score(["a", "b"], ["a", "a", "b"]) == pytest.approx(1 - (2 / 3) / 3)


def test_edit_distance_costs():
    assert metrics.weighted_edit_distance(["a", "b"], []) == 6  # two insertions
    assert metrics.weighted_edit_distance([], ["a", "b"]) == 4  # two deletions
    assert metrics.weighted_edit_distance(["a"], ["b"]) == 1  # one substitution
    assert metrics.weighted_edit_distance(["a"], ["b"], p1=1, p2=1, p3=5) == 2  # delete + insert is cheaper


def test_ordering_clamps_at_p():
    # dist/max(n, m) above p gives 0 whatever the recall factor.
    assert metrics.ordering_score(["a"], ["a", "x", "y"], p2=10) == 0.0


def test_image_markers_and_stripping():
    text = "First <img2> then text <img10>.\nEnd<img1>"
    assert metrics.image_markers(text) == ["img2", "img10", "img1"]
    assert metrics.strip_image_markers(text) == "First then text .\nEnd"
    assert metrics.image_markers("no images, <img> <imgx>") == []


def test_rouge_lsum_uses_stemming():
    assert metrics.rouge_lsum("The cats are running", "the cat is run") == pytest.approx(0.75)  # the, cat, run
    assert metrics.rouge_lsum("identical text here", "identical text here") == pytest.approx(1.0)
    assert metrics.rouge_lsum("something", "") == 0.0


def test_aggregate_and_table():
    rows = {
        "wit": [metrics.score_answer(["a"], ["a"], "x y", "x y", 0.5), metrics.ZERO_SCORES],
        "web": [metrics.score_answer(["a", "b"], ["b"], "x y", "x", 1.0)],
    }
    table = metrics.aggregate(rows)
    assert list(table) == ["wit", "web", metrics.AVERAGE_ROW]
    assert list(table["wit"]) == list(metrics.COLUMNS)
    assert table["wit"]["Prec."] == pytest.approx(50.0)
    assert table["wit"]["B.S."] == pytest.approx(25.0)
    assert table["web"]["Rec."] == pytest.approx(50.0)
    assert table["web"]["Ord."] == pytest.approx(100 * 0.5 * (1 - (3 / 2) / 3))
    assert table["Average"]["Prec."] == pytest.approx(75.0)
    text = metrics.format_table(table)
    assert text.splitlines()[0].split() == ["Dataset", *metrics.COLUMNS]
    assert "50.00" in text.splitlines()[1]


def test_aggregate_without_bertscore_shows_dash():
    table = metrics.aggregate({"wit": [metrics.score_answer([], [], "a", "a")]})
    assert table["wit"]["B.S."] is None
    assert metrics.format_table(table).splitlines()[1].split()[-1] == "-"
    assert metrics.AVERAGE_ROW not in table


def test_aggregate_rejects_empty_dataset():
    with pytest.raises(ValueError, match="'wit' has no scored questions"):
        metrics.aggregate({"wit": []})
