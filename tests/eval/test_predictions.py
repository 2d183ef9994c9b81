"""The predictions jsonl: errors that name the line, and a write/read round trip."""

import pytest

from m2io_jax.eval import predictions


def test_bad_predictions_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "q1", "dataset": "tiny", "final_output": "x"}\n{"id": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing keys \['dataset', 'final_output'\]"):
        predictions.read_predictions(str(path))
    path.write_text('{"id": "q1", "dataset": "t", "final_output": "x"}\n'
                    '{"id": "q1", "dataset": "t", "final_output": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: duplicate prediction"):
        predictions.read_predictions(str(path))
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        predictions.read_predictions(str(path))


def test_written_predictions_read_back(tmp_path):
    path = str(tmp_path / "out" / "preds.jsonl")
    written = [predictions.Prediction("q1", "x", "Hi.<img1> Then <img3>.", {"img1": "a", "img2": "b"})]
    assert predictions.write_predictions(path, written) == 1
    read = predictions.read_predictions(path)
    assert read == {("x", "q1"): written[0]}
    assert read[("x", "q1")].images() == ["a", "<unmapped:img3>"]
