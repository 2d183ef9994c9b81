"""Retriever and recall: the full path (chunk, embed, ScaNN, top-k, candidates), and the MiniLM acceptance figure."""

import json
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from m2io_jax.data import config as data_config
from m2io_jax.data import mramg
from m2io_jax.data.demo import demo_root
from m2io_jax.inserter import candidates
from m2io_jax.retrieval import chunking, recall
from m2io_jax.retrieval import retriever as retriever_lib


class HashedBagOfWords:
    """A small deterministic text encoder (hashed unigram counts), enough to retrieve by shared words."""

    dim = 512

    def encode(self, texts, batch_size=64):
        del batch_size
        out = np.zeros((len(texts), self.dim), np.float32)  # [N, D]
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if len(word) > 3:
                    out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def test_retriever_end_to_end_on_demo_recipe():
    ds = mramg.load_dataset(demo_root(), "demo_recipe")
    retriever = retriever_lib.Retriever.build(ds.documents, HashedBagOfWords(), max_tokens=64, batch_size=64)
    assert len(retriever.chunks) > len(ds.documents)  # 64-token chunks split every recipe
    result = recall.evaluate_recall(ds.questions, retriever, k=10)
    assert result["questions_with_images"] == sum(bool(q.images) for q in ds.questions)
    assert result["visual_recall"] >= 0.9 and result["doc_recall"] >= 0.9
    q = next(q for q in ds.questions if len(q.images) == 4)
    hits = retriever.search([q.question], 10)[0]
    assert len(hits) == 10 and hits[0].score >= hits[-1].score
    cands = candidates.candidates_for_split(
        q, [h.chunk for h in hits], ds.images, split="train", settings=data_config.get_config().candidates,
        extra_chunks=retriever_lib.gold_chunks(q, retriever))
    assert len(cands.gold) == 4 and set(cands.image_map.values()) >= set(q.images)
    assert re.fullmatch(r"[^<]*(<img\d+>[^<]*){4}", candidates.render_gold(q, cands))


def test_visual_recall():
    c1 = chunking.Chunk("d1", 0, "Alpha.<PIC> Beta.<PIC>", ("b", "a"), "x")
    c2 = chunking.Chunk("d2", 0, "Gamma.<PIC>", ("c",), "x")
    assert recall.visual_recall(["a", "d"], [c1, c2]) == 0.5
    assert recall.visual_recall(["a", "a", "c"], [c1, c2]) == 1.0
    assert recall.visual_recall([], [c1]) is None


def test_length_fn_from_encoder_tokenizer():
    class WithCount:
        def count_tokens(self, texts):
            return [len(t.split()) * 2 for t in texts]

    assert retriever_lib.token_length_fn(WithCount())("a b c") == 6
    assert retriever_lib.token_length_fn(HashedBagOfWords())("a b, c") == 4  # wordpiece estimate


@pytest.mark.slow
def test_minilm_scann_visual_recall_at_10_on_demo():
    """Acceptance: visual recall@10 >= 0.9 on each demo dataset, printed by the recall command."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("demo_web", "demo_recipe", "demo_manual"):
        out = subprocess.run(
            [sys.executable, "-m", "m2io_jax.retrieval.recall", f"--dataset={name}", "--config.retrieval.top_k=10"],
            capture_output=True, text=True, check=True, env=env, timeout=600)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["dataset"] == name and result["k"] == 10
        assert result["visual_recall"] >= 0.9, result
