"""MRAMG-Bench statistical generation metrics: image precision/recall/F1, image ordering, ROUGE-Lsum.

Definitions follow MRAMG-Bench (arXiv 2502.04176) and the third-party reference implementation recorded in
`reference/m2io-and-mramg.md` section 5.4:

- Image precision, recall and F1 are computed on the *sets* of gold and predicted images, with the reference's
  edge cases: both empty -> 1/1/1; empty prediction -> precision 0; empty gold -> recall 1; P + R = 0 -> F1 0.
- The ordering score is `max(0, rf * (1 - min(dist / max(n, m), p) / p))`, where `dist` is the weighted edit
  distance that turns the predicted sequence B into the gold sequence A (insertion p1=3, deletion p2=2,
  substitution p3=1), `rf = |set(A) & set(B)| / |A|`, and p=3.
- ROUGE-Lsum: `rouge_score` `rougeLsum` F-measure with the Porter stemmer, reference = ground truth.

Per-question scores are averaged per dataset and reported x100 in the MRAMG column order
(Prec., Rec., F1, Ord., R.L., B.S.). BERTScore lives in `m2io_jax.eval.bertscore`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence

from rouge_score import rouge_scorer

from m2io_jax.data.sentences import IMG_RE

COLUMNS: tuple[str, ...] = ("Prec.", "Rec.", "F1", "Ord.", "R.L.", "B.S.")
"""Report columns, in the order of the MRAMG-Bench tables."""

AVERAGE_ROW = "Average"


def image_markers(text: str) -> list[str]:
    """Every `<imgN>` placeholder in `text`, in order of appearance, as ids without brackets (`img3`)."""
    return [f"img{m.group(1)}" for m in IMG_RE.finditer(text)]


def strip_image_markers(text: str) -> str:
    """`text` with every `<imgN>` placeholder removed and the whitespace around it collapsed."""
    return re.sub(r"[ \t]{2,}", " ", IMG_RE.sub("", text)).strip()


def image_scores(gold: Sequence[str], pred: Sequence[str]) -> tuple[float, float, float]:
    """Image precision, recall and F1 of `pred` against `gold`, on sets.

    Edge cases (as in the reference code): both empty -> (1, 1, 1); empty prediction -> precision 0;
    empty gold -> recall 1; precision + recall = 0 -> F1 0.
    """
    gold_set, pred_set = set(gold), set(pred)
    if not gold_set and not pred_set:
        return 1.0, 1.0, 1.0
    true_positives = len(gold_set & pred_set)
    precision = true_positives / len(pred_set) if pred_set else 0.0
    recall = true_positives / len(gold_set) if gold_set else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def weighted_edit_distance(
    gold: Sequence[str], pred: Sequence[str], *, p1: float = 3.0, p2: float = 2.0, p3: float = 1.0
) -> float:
    """Minimum cost to turn `pred` (B) into `gold` (A).

    Costs: p1 per insertion (B misses an image of A), p2 per deletion (B has an extra image), p3 per
    substitution (an image of B at the wrong position).
    """
    n, m = len(gold), len(pred)
    # previous[j] = D[i-1][j]; D[i][0] = i * p1, D[0][j] = j * p2.
    previous = [j * p2 for j in range(m + 1)]
    for i in range(1, n + 1):
        current = [i * p1] + [0.0] * m
        for j in range(1, m + 1):
            current[j] = min(
                previous[j] + p1,
                current[j - 1] + p2,
                previous[j - 1] + (0.0 if gold[i - 1] == pred[j - 1] else p3),
            )
        previous = current
    return float(previous[m])


def ordering_score(
    gold: Sequence[str],
    pred: Sequence[str],
    *,
    p1: float = 3.0,
    p2: float = 2.0,
    p3: float = 1.0,
    p: float = 3.0,
) -> float:
    """MRAMG image ordering score in [0, 1] (reference pseudo-code, defaults p1=3, p2=2, p3=1, p=3).

    Both empty -> 1; empty gold with a non-empty prediction -> 0; no gold image predicted -> 0.
    """
    n, m = len(gold), len(pred)
    if n == 0 and m == 0:
        return 1.0
    if n == 0:
        return 0.0
    recall_factor = len(set(gold) & set(pred)) / n
    if recall_factor == 0:
        return 0.0
    normalised = weighted_edit_distance(gold, pred, p1=p1, p2=p2, p3=p3) / max(n, m)
    return max(0.0, recall_factor * (1.0 - min(normalised, p) / p))


@functools.cache
def _rouge_lsum_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)


def rouge_lsum(reference: str, prediction: str) -> float:
    """ROUGE-Lsum F-measure (Porter stemming) of `prediction` against `reference`, in [0, 1]."""
    return float(_rouge_lsum_scorer().score(reference, prediction)["rougeLsum"].fmeasure)


@dataclasses.dataclass(frozen=True)
class QuestionScores:
    """Metrics of one answer, each in [0, 1]; `bert_score` is None when BERTScore was not computed."""

    precision: float
    recall: float
    f1: float
    ordering: float
    rouge_l: float
    bert_score: float | None = None

    def as_row(self) -> tuple[float | None, ...]:
        """The values in `COLUMNS` order."""
        return (self.precision, self.recall, self.f1, self.ordering, self.rouge_l, self.bert_score)


ZERO_SCORES = QuestionScores(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
"""The score of a question that has no prediction."""


def score_answer(
    gold_images: Sequence[str],
    pred_images: Sequence[str],
    reference_text: str,
    answer_text: str,
    bert_score: float | None = None,
) -> QuestionScores:
    """All statistical metrics of one answer (the text arguments are compared as given)."""
    precision, recall, f1 = image_scores(gold_images, pred_images)
    return QuestionScores(
        precision=precision,
        recall=recall,
        f1=f1,
        ordering=ordering_score(gold_images, pred_images),
        rouge_l=rouge_lsum(reference_text, answer_text),
        bert_score=bert_score,
    )


def aggregate(scores: Mapping[str, Sequence[QuestionScores]]) -> dict[str, dict[str, float | None]]:
    """Per-dataset means x100 in `COLUMNS` order, plus an `Average` row (unweighted mean over datasets).

    A column is None where no question of the dataset has that metric (BERTScore switched off).
    """
    table: dict[str, dict[str, float | None]] = {}
    for dataset, rows in scores.items():
        if not rows:
            raise ValueError(f"dataset {dataset!r} has no scored questions")
        columns = list(zip(*(r.as_row() for r in rows)))
        table[dataset] = {
            name: (None if any(v is None for v in values) else 100.0 * math.fsum(values) / len(values))
            for name, values in zip(COLUMNS, columns)
        }
    if len(table) > 1:
        table[AVERAGE_ROW] = {
            name: (
                None
                if any(row[name] is None for row in table.values())
                else math.fsum(row[name] for row in table.values()) / len(table)
            )
            for name in COLUMNS
        }
    return table


def format_table(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """A fixed-width text table: one row per dataset, two decimals, `-` for a metric not computed."""
    width = max([len("Dataset")] + [len(name) for name in table])
    lines = [f"{'Dataset':<{width}}  " + "  ".join(f"{c:>6}" for c in COLUMNS)]
    for name, row in table.items():
        cells = ("-" if row.get(c) is None else f"{row[c]:.2f}" for c in COLUMNS)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell:>6}" for cell in cells))
    return "\n".join(lines)
