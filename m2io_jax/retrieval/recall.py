"""Retrieval recall on MRAMG-format datasets: visual recall@k of gold images, plus document and chunk recall.

    python -m m2io_jax.retrieval.recall --dataset demo_manual [--split test]
    python -m m2io_jax.retrieval.recall --config=configs/mramg.py:/path/to/MRAMG --config.retrieval.top_k=20

Settings come from `--config` (default: the package's `m2io_jax.data.config`): `data_dir` ("" = the embedded
demo corpus), `retrieval.top_k` (k), `retrieval.encoder_path`, `retrieval.batch_size`, `retrieval.index`,
`chunk.max_tokens`, and `split` (the split rule behind `--split`). `--dataset` measures one dataset; without
it every dataset of `config.datasets` is measured.

Definitions (averaged over questions; visual and chunk recall over questions with at least one gold image):
  visual recall@k  share of a question's distinct gold images that appear in its top-k chunks (MRAMG-Bench);
  doc recall@k     share of its provenance documents with at least one chunk in the top k;
  chunk recall@k   share of its gold chunks (provenance chunks holding a gold image) in the top k.
Each dataset's report ends with one line holding a JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterable, Sequence

import ml_collections
import numpy as np
from absl import flags

from m2io_jax import cli
from m2io_jax.data import config as data_config
from m2io_jax.data import mramg
from m2io_jax.data import splits as splits_lib
from m2io_jax.data.demo import demo_root
from m2io_jax.models import sentence_encoder
from m2io_jax.retrieval import chunking
from m2io_jax.retrieval import retriever as retriever_lib

_DATASET = flags.DEFINE_string("dataset", None, "dataset to measure, e.g. recipe or demo_manual (default: each of "
                               "config.datasets)", allow_override=True)
_SPLIT = flags.DEFINE_enum("split", None, splits_lib.SPLITS, "measure only this split's questions (default: all)",
                           allow_override=True)
_CONFIG = cli.define_config(data_config, "data and retrieval settings (default: m2io_jax/data/config.py)")


def visual_recall(gold: Sequence[str], chunks: Iterable[chunking.Chunk]) -> float | None:
    """Share of distinct gold images present in `chunks`; None when there is no gold image."""
    gold_set = set(gold)
    if not gold_set:
        return None
    return len(gold_set & set(chunking.distinct_images(chunks))) / len(gold_set)


def evaluate_recall(
    questions: Sequence[mramg.Question], retriever: retriever_lib.Retriever, k: int
) -> dict[str, float | int]:
    """Visual, document and chunk recall@k of `retriever` on `questions`."""
    hits = retriever.search([q.question for q in questions], k)
    visual, doc, chunk = [], [], []
    for q, found in zip(questions, hits):
        top = [h.chunk for h in found]
        if q.provenance:
            docs = {c.doc_id for c in top}
            doc.append(float(np.mean([d in docs for d in dict.fromkeys(q.provenance)])))
        v = visual_recall(q.images, top)
        if v is not None:
            visual.append(v)
            gold = retriever_lib.gold_chunks(q, retriever)
            if gold:
                keys = {(c.doc_id, c.index) for c in top}
                chunk.append(float(np.mean([(c.doc_id, c.index) in keys for c in gold])))
    return {
        "k": k,
        "questions": len(questions),
        "questions_with_images": len(visual),
        "visual_recall": float(np.mean(visual)) if visual else float("nan"),
        "doc_recall": float(np.mean(doc)) if doc else float("nan"),
        "chunk_recall": float(np.mean(chunk)) if chunk else float("nan"),
    }


def data_root(config: ml_collections.ConfigDict) -> str:
    """`config.data_dir`, or the embedded demo corpus when it is empty; a missing directory is a UserError."""
    if not config.data_dir:
        return demo_root()
    if not os.path.isdir(config.data_dir):
        raise cli.UserError(f"config.data_dir={config.data_dir}: no such directory (expected an MRAMG-layout download)")
    return config.data_dir


def run(config: ml_collections.ConfigDict, dataset: str, split: str | None = None) -> dict:
    """Loads `dataset`, builds the retriever over its whole corpus and measures recall on its questions.

    `split` restricts the questions to one split of `config.split`'s rule (None = every question).
    """
    start = time.perf_counter()
    root = data_root(config)
    if dataset not in mramg.dataset_names(root):
        raise cli.UserError(f"no dataset {dataset!r} in {root} "
                            f"(found: {', '.join(mramg.dataset_names(root)) or 'none'})")
    ds = mramg.load_dataset(root, dataset)
    questions = ds.questions
    if split:
        rule = splits_lib.SplitRule.from_config(config.split)
        q_split, _ = splits_lib.assign_splits(dataset, [(q.id, q.provenance) for q in questions], rule)
        questions = [q for q in questions if q_split[q.id] == split]
    encoder = sentence_encoder.load_encoder(config.retrieval.encoder_path)
    retriever = retriever_lib.Retriever.from_config(ds.documents, encoder, config)
    result = {"dataset": dataset, "split": split or "all", "chunks": len(retriever.chunks),
              "documents": len(ds.documents), "problems": len(ds.report.problems)}
    result.update(evaluate_recall(questions, retriever, config.retrieval.top_k))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def report(result: dict) -> str:
    """Three readable lines and the JSON line of one dataset's `run` result."""
    k = result["k"]
    return "\n".join(
        [
            f"{result['dataset']} ({result['split']}): {result['questions']} questions, {result['chunks']} chunks "
            f"of {result['documents']} documents",
            f"visual recall@{k}: {result['visual_recall']:.4f} over {result['questions_with_images']} questions "
            "with images",
            f"doc recall@{k}: {result['doc_recall']:.4f}   chunk recall@{k}: {result['chunk_recall']:.4f}",
            json.dumps(result),
        ]
    )


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    config = _CONFIG.value
    for dataset in [_DATASET.value] if _DATASET.value else config.datasets:
        print(report(run(config, dataset, _SPLIT.value)), flush=True)


if __name__ == "__main__":
    cli.run(main)
