"""Retrieval recall on an MRAMG-format dataset: visual recall@k of gold images, plus document and chunk recall.

    python -m m2io_jax.retrieval.recall --dataset demo_manual [--data DIR] [--k 10] [--split test]

Definitions (averaged over questions; visual and chunk recall over questions with at least one gold image):
  visual recall@k  share of a question's distinct gold images that appear in its top-k chunks (MRAMG-Bench);
  doc recall@k     share of its provenance documents with at least one chunk in the top k;
  chunk recall@k   share of its gold chunks (provenance chunks holding a gold image) in the top k.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np

from m2io_jax.data import mramg
from m2io_jax.data import prompts
from m2io_jax.data import splits as splits_lib
from m2io_jax.retrieval import retriever as retriever_lib


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
        v = prompts.visual_recall(q.images, top)
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


def run(data: str, dataset: str, *, k: int, split: str = "", encoder_path: str = "", max_tokens: int = 256,
        batch_size: int = 64, index_overrides: dict | None = None, split_fractions: splits_lib.SplitFractions = splits_lib.SplitFractions(),
        salt: str = "m2io") -> dict:
    """Loads `dataset`, builds the retriever over its whole corpus and measures recall on its questions."""
    start = time.perf_counter()
    ds = mramg.load_dataset(data, dataset)
    questions = ds.questions
    if split:
        q_split, _ = splits_lib.assign_splits(dataset, [(q.id, q.provenance) for q in questions], split_fractions, salt)
        questions = [q for q in questions if q_split[q.id] == split]
    encoder = retriever_lib.load_encoder(encoder_path)
    retriever = retriever_lib.Retriever.build(
        ds.documents, encoder, max_tokens=max_tokens, batch_size=batch_size, index_overrides=index_overrides)
    result = {"dataset": dataset, "split": split or "all", "chunks": len(retriever.chunks),
              "documents": len(ds.documents), "problems": len(ds.report.problems)}
    result.update(evaluate_recall(questions, retriever, k))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags  # pylint: disable=g-import-not-at-top

    from m2io_jax.data import config as config_lib  # pylint: disable=g-import-not-at-top
    from m2io_jax.data.demo import demo_root  # pylint: disable=g-import-not-at-top

    f = flags.FLAGS
    cfg = config_lib.get_data_config()
    data = f.data or cfg.data_dir or demo_root()
    result = run(
        data, f.dataset, k=f.k or cfg.retrieval.top_k, split=f.split,
        encoder_path=f.encoder or cfg.retrieval.encoder_path, max_tokens=cfg.chunk.max_tokens,
        batch_size=cfg.retrieval.batch_size, index_overrides=cfg.retrieval.index.to_dict(),
        split_fractions=splits_lib.SplitFractions(cfg.split.validation, cfg.split.test), salt=cfg.split.salt,
    )
    k = result["k"]
    print(f"{result['dataset']} ({result['split']}): {result['questions']} questions, {result['chunks']} chunks "
          f"of {result['documents']} documents")
    print(f"visual recall@{k}: {result['visual_recall']:.4f} over {result['questions_with_images']} questions with images")
    print(f"doc recall@{k}: {result['doc_recall']:.4f}   chunk recall@{k}: {result['chunk_recall']:.4f}")
    print(json.dumps(result))


def _define_flags() -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top

    flags.DEFINE_string("data", "", "MRAMG-layout directory (default: the embedded demo corpus)")
    flags.DEFINE_string("dataset", None, "dataset name, e.g. recipe or demo_manual", required=True)
    flags.DEFINE_integer("k", None, "chunks retrieved per question (default: config retrieval.top_k = 10)")
    flags.DEFINE_string("split", "", "evaluate only this split's questions (train/validation/test); default all")
    flags.DEFINE_string("encoder", "", "text encoder checkpoint directory (default: packaged MiniLM)")


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top

    _define_flags()
    app.run(main)
