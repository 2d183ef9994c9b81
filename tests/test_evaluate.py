"""`python -m m2io_jax.evaluate` on a tiny MRAMG-layout fixture and on the demo corpus."""

import dataclasses
import json
import subprocess
import sys

import pytest

from m2io_jax import evaluate
from m2io_jax.eval import metrics

QUESTIONS = [
    {"id": "q1", "question": "How to bake?", "provenance": [1], "images_list": ["a", "b"],
     "ground_truth": "Mix the flour. <PIC> Bake for twenty minutes. <PIC>"},
    {"id": "q2", "question": "Reset?", "provenance": [1], "images_list": ["c"],
     "ground_truth": "Hold the button. <PIC>"},
    {"id": "q3", "question": "No image?", "provenance": [1], "images_list": [],
     "ground_truth": "Just text."},
]


@pytest.fixture()
def data_dir(tmp_path):
    document = [1, "Mix. <PIC> Bake. <PIC> Hold. <PIC>", ["a", "b", "c"]]
    (tmp_path / "doc_tiny.jsonl").write_text(json.dumps(document) + "\n")
    (tmp_path / "tiny_mqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "images_info").mkdir()
    (tmp_path / "images_info" / "tiny_imgs_collection.json").write_text(
        json.dumps({n: {"image_caption": n, "image_path": f"{n}.png"} for n in "abc"})
    )
    return tmp_path


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_scores_table(data_dir, tmp_path):
    predictions_path = _write(tmp_path / "pred.jsonl", [
        # q1: images swapped (b, a) and text identical once markers are stripped.
        {"id": "q1", "dataset": "tiny", "final_output": "Mix the flour. <img2> Bake for twenty minutes. <img1>",
         "image_map": {"img1": "a", "img2": "b"}},
        # q2: <img3> is not in the map -> a wrong image.
        {"id": "q2", "dataset": "tiny", "final_output": "Hold the button. <img3>", "image_map": {"img1": "c"}},
        {"id": "zzz", "dataset": "tiny", "final_output": "unknown question", "image_map": {}},
    ])  # q3 missing: scores 0
    table, results = evaluate.evaluate(predictions_path, str(data_dir), bertscore=False)
    (result,) = results
    assert result.missing == ["q3"] and result.unknown == ["zzz"]
    q1, q2, q3 = (result.scores[q] for q in ("q1", "q2", "q3"))
    assert (q1.precision, q1.recall, q1.f1) == (1.0, 1.0, 1.0)
    assert q1.ordering == pytest.approx(metrics.ordering_score(["a", "b"], ["b", "a"]))
    assert q1.rouge_l == pytest.approx(1.0)  # markers stripped on both sides
    assert (q2.precision, q2.recall, q2.ordering) == (0.0, 0.0, 0.0)
    assert q3 == dataclasses.replace(metrics.ZERO_SCORES, bert_score=None)
    assert table["tiny"]["Prec."] == pytest.approx(100 / 3)
    assert table["tiny"]["B.S."] is None
    raw, _ = evaluate.evaluate(predictions_path, str(data_dir), bertscore=False, strip_markers=False)
    assert raw["tiny"]["R.L."] < table["tiny"]["R.L."]


def test_cli_with_bertscore(data_dir, tmp_path):
    predictions_path = _write(tmp_path / "pred.jsonl", [
        {"id": q["id"], "dataset": "tiny", "final_output": q["ground_truth"].replace("<PIC>", ""), "image_map": {}}
        for q in QUESTIONS
    ])
    out = tmp_path / "scores.json"
    proc = subprocess.run(
        [sys.executable, "-m", "m2io_jax.evaluate", f"--predictions={predictions_path}", f"--data={data_dir}",
         f"--output={out}"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = proc.stdout.splitlines()[:2]
    assert header.split() == ["Dataset", *metrics.COLUMNS]
    assert "tiny: 3 questions, 3 answered, 0 missing" in proc.stdout
    written = json.loads(out.read_text())
    assert written["table"]["tiny"]["B.S."] == pytest.approx(100.0, abs=1e-3)  # identical texts
    assert written["table"]["tiny"]["R.L."] == pytest.approx(100.0)
    assert written["datasets"]["tiny"]["scores"]["q3"]["f1"] == 1.0  # no gold, no prediction: perfect


def test_demo_corpus_gold_answers_score_perfectly(tmp_path):
    from m2io_jax.data import demo, mramg

    root = demo.demo_root()
    name = demo.DEMO_DATASETS[0]
    questions = mramg.load_dataset(root, name, check_images=False).questions
    records = []
    for q in questions:
        markers = " ".join(f"<img{i + 1}>" for i in range(len(q.images)))
        records.append({"id": q.id, "dataset": name, "final_output": f"{q.answer} {markers}",
                        "image_map": {f"img{i + 1}": image for i, image in enumerate(q.images)}})
    table, _ = evaluate.evaluate(_write(tmp_path / "p.jsonl", records), root, bertscore=False)
    assert table[name]["F1"] == pytest.approx(100.0) and table[name]["Ord."] == pytest.approx(100.0)
    assert table[name]["R.L."] == pytest.approx(100.0)


def test_cli_reports_a_malformed_predictions_file_in_one_line(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "dataset": "tiny", "final_output": "x", "image_map": {}}\nnot json\n')
    proc = subprocess.run(
        [sys.executable, "-m", "m2io_jax.evaluate", f"--predictions={bad}", f"--data={data_dir}",
         "--config.bertscore.enabled=false", "--config.strip_image_markers=false"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"evaluate: error: {bad}:2: invalid JSON: Expecting value"]
