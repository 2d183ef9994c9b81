r"""Scores multimodal answers against MRAMG-format data and prints the MRAMG statistical-metric table.

    python -m m2io_jax.evaluate --predictions answers.jsonl --data /path/to/MRAMG [--output scores.json] \
        [--config.strip_image_markers=false] [--config.bertscore.enabled=false]

Predictions: one JSON object per line,
    {"id": "<question id>", "dataset": "<name>", "final_output": "text with <img1> ... <imgN>",
     "image_map": {"img1": "<image name>", ...}}
The predicted images are every `<imgN>` of `final_output`, in order, mapped through `image_map`; an `imgN`
missing from the map counts as a wrong image. Gold images and the reference answer are the question's
`images_list` and `ground_truth` read with `m2io_jax.data.mramg.load_dataset`.

Every question of each scored dataset counts: a question without a prediction scores 0 on every metric and is
reported as missing. Columns: Prec., Rec., F1, Ord. (image metrics), R.L. (ROUGE-Lsum), B.S. (BERTScore F1), all
x100; see `m2io_jax.eval.metrics` and `m2io_jax.eval.bertscore` for the definitions.

Our choice (the official behaviour is not published): `<imgN>` markers are stripped from the answer, and the
reference answer is taken without its image markers, before ROUGE-L and BERTScore
(`--config.strip_image_markers=false` compares the raw strings, as the third-party reference code appears to).
The scoring settings are the `--config` (default `m2io_jax/eval/config.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from m2io_jax import cli
from m2io_jax.data import mramg
from m2io_jax.eval import config as eval_config
from m2io_jax.eval import metrics
from m2io_jax.eval.predictions import Prediction, PredictionsError, read_predictions


@dataclasses.dataclass
class DatasetResult:
    """Per-question scores of one dataset and what was missing or unexpected."""

    name: str
    scores: dict[str, metrics.QuestionScores]
    missing: list[str]
    unknown: list[str]


def score_dataset(
    questions: Sequence[mramg.Question],
    predictions: dict[str, Prediction],
    *,
    name: str,
    strip_markers: bool = True,
    encoder: Any = None,
    bertscore_layer: int | None = None,
) -> DatasetResult:
    """Scores the questions of one dataset; `predictions` maps question id -> Prediction.

    `encoder`: a `SentenceEncoder` for BERTScore, or None to skip BERTScore (the B.S. column is then empty).
    """
    answered = [q for q in questions if q.id in predictions]
    references, answers = [], []
    for q in answered:
        text = predictions[q.id].final_output
        references.append(q.answer if strip_markers else q.ground_truth)
        answers.append(metrics.strip_image_markers(text) if strip_markers else text)
    bert_f1: Sequence[float | None] = [None] * len(answered)
    if encoder is not None and answered:
        from m2io_jax.eval import bertscore

        bert_f1 = [float(x) for x in bertscore.bert_score(answers, references, encoder, layer=bertscore_layer)[2]]
    scores = {
        q.id: metrics.score_answer(q.images, predictions[q.id].images(), ref, ans, f1)
        for q, ref, ans, f1 in zip(answered, references, answers, bert_f1)
    }
    missing = [q.id for q in questions if q.id not in predictions]
    zero = metrics.ZERO_SCORES if encoder is not None else dataclasses.replace(metrics.ZERO_SCORES, bert_score=None)
    scores.update({qid: zero for qid in missing})
    scores = {q.id: scores[q.id] for q in questions}  # question order
    known = {q.id for q in questions}
    return DatasetResult(name, scores, missing, sorted(i for i in predictions if i not in known))


def evaluate(
    predictions_path: str,
    data_root: str,
    *,
    datasets: Sequence[str] = (),
    strip_markers: bool = True,
    bertscore: bool = True,
    encoder_path: str = "",
    bertscore_layer: int | None = None,
) -> tuple[dict[str, dict[str, float | None]], list[DatasetResult]]:
    """Scores a predictions file; returns (table, per-dataset results). See the module docstring."""
    predictions = read_predictions(predictions_path)
    names = list(datasets) or sorted(
        {d for d, _ in predictions},
        key=lambda d: (mramg.DATASETS.index(d) if d in mramg.DATASETS else len(mramg.DATASETS), d)
    )
    if not names:
        raise cli.UserError(f"{predictions_path}: no predictions and no --datasets given: nothing to score")
    encoder = None
    if bertscore:
        from m2io_jax.models.sentence_encoder import load_encoder

        encoder = load_encoder(encoder_path)
    results = []
    for name in names:
        dataset = mramg.load_dataset(data_root, name, strict=False, check_images=False)
        by_id = {qid: p for (d, qid), p in predictions.items() if d == name}
        results.append(
            score_dataset(dataset.questions, by_id, name=name, strip_markers=strip_markers, encoder=encoder,
                          bertscore_layer=bertscore_layer)
        )
    table = metrics.aggregate({r.name: list(r.scores.values()) for r in results})
    return table, results


def report(table: dict[str, dict[str, float | None]], results: Sequence[DatasetResult]) -> str:
    """The metric table followed by one line per dataset with question / missing / unknown counts."""
    lines = [metrics.format_table(table), ""]
    for r in results:
        lines.append(
            f"{r.name}: {len(r.scores)} questions, {len(r.scores) - len(r.missing)} answered, "
            f"{len(r.missing)} missing (scored 0), {len(r.unknown)} predictions for unknown question ids"
            + (f" (e.g. {r.unknown[:3]})" if r.unknown else "")
        )
    return "\n".join(lines)


def to_json(table: dict[str, dict[str, float | None]], results: Sequence[DatasetResult],
            settings: dict[str, Any]) -> dict:
    """The JSON written by `--output`: table, counts, settings and per-question scores (in [0, 1])."""
    return {
        "table": table,
        "columns": list(metrics.COLUMNS),
        "settings": settings,
        "datasets": {
            r.name: {
                "questions": len(r.scores),
                "missing": r.missing,
                "unknown_predictions": r.unknown,
                "scores": {qid: dataclasses.asdict(s) for qid, s in r.scores.items()},
            }
            for r in results
        },
    }


_PREDICTIONS = flags.DEFINE_string("predictions", None, "predictions jsonl (one answer per line; see module doc)")
_DATA = flags.DEFINE_string("data", None, "MRAMG-format data directory (doc_*.jsonl, *_mqa.jsonl, images_info/)")
_DATASETS = flags.DEFINE_list("datasets", [], "datasets to score (default: every dataset named in the predictions)")
_OUTPUT = flags.DEFINE_string("output", "", "write the table, counts and per-question scores to this JSON file")
_CONFIG = cli.define_config(eval_config, "scoring settings (image markers, BERTScore encoder and layer)")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_PREDICTIONS, _DATA)
    config = _CONFIG.value
    bertscore = config.bertscore
    settings = {
        "predictions": os.path.abspath(_PREDICTIONS.value),
        "data": os.path.abspath(_DATA.value),
        "strip_image_markers": config.strip_image_markers,
        "bertscore": bertscore.enabled,
        "encoder": bertscore.encoder_path or ("default MiniLM" if bertscore.enabled else ""),
        "bertscore_layer": bertscore.layer,
    }
    try:
        table, results = evaluate(
            _PREDICTIONS.value, _DATA.value, datasets=_DATASETS.value, strip_markers=config.strip_image_markers,
            bertscore=bertscore.enabled, encoder_path=bertscore.encoder_path, bertscore_layer=bertscore.layer,
        )
    except PredictionsError as error:
        raise cli.UserError(str(error)) from error
    print(report(table, results))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            json.dump(to_json(table, results, settings), f, indent=2)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
