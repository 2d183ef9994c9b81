"""The predictions file: one JSON object per line, written by systems and read by `m2io_jax.evaluate`.

    {"id": "<question id>", "dataset": "<name>", "final_output": "text with <img1> ... <imgN>",
     "image_map": {"img1": "<image name>", ...}}
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

from m2io_jax.eval import metrics


class PredictionsError(ValueError):
    """A malformed predictions file; the message names file:line and what was wrong."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One answer: its question, the text with `<imgN>` markers and the marker -> image-name map."""

    id: str
    dataset: str
    final_output: str
    image_map: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    def images(self) -> list[str]:
        """Predicted image names in order; an unmapped marker becomes a name no gold image has."""
        return [self.image_map.get(m, f"<unmapped:{m}>") for m in metrics.image_markers(self.final_output)]


def read_predictions(path: str) -> dict[tuple[str, str], Prediction]:
    """Reads a predictions jsonl into {(dataset, id): Prediction}; any malformed line raises, naming file:line."""
    out: dict[tuple[str, str], Prediction] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictionsError(f"{where}: invalid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise PredictionsError(f"{where}: expected a JSON object, found {type(record).__name__}")
            missing = [k for k in ("id", "dataset", "final_output") if k not in record]
            if missing:
                raise PredictionsError(
                    f"{where}: missing keys {missing}; expected id, dataset, final_output, image_map")
            if not isinstance(record["final_output"], str):
                found = type(record["final_output"]).__name__
                raise PredictionsError(f"{where}: final_output must be a string, found {found}")
            image_map = record.get("image_map") or {}
            if not isinstance(image_map, dict) or not all(isinstance(v, str) for v in image_map.values()):
                raise PredictionsError(f"{where}: image_map must map marker ids ('img1') to image names (strings)")
            prediction = Prediction(str(record["id"]), str(record["dataset"]), record["final_output"], image_map)
            key = (prediction.dataset, prediction.id)
            if key in out:
                raise PredictionsError(f"{where}: duplicate prediction for dataset {key[0]!r} question {key[1]!r}")
            out[key] = prediction
    return out


def write_predictions(path: str, predictions: Iterable[Prediction]) -> int:
    """Writes predictions as jsonl (creating parent directories); returns the number of lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(p.to_json() + "\n")
            n += 1
    return n
