"""The saved index: Retriever.save / load search identically, index_cache rebuilds when stale, the build_index
command writes what it reads."""

import json
import os
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from m2io_jax.data import config as data_config
from m2io_jax.data import mramg
from m2io_jax.data.demo import demo_root
from m2io_jax.models import sentence_encoder
from m2io_jax.retrieval import index_cache
from m2io_jax.retrieval import retriever as retriever_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class HashedBagOfWords:
    """A deterministic stand-in encoder (hashed word counts, L2-normalised): fast, and retrieves by shared words."""

    dim = 256

    def encode(self, texts, batch_size=64):
        del batch_size
        out = np.zeros((len(texts), self.dim), np.float32)  # [N, D]
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def _data(max_tokens: int = 64):
    data = data_config.get_config()
    data.chunk.max_tokens = max_tokens
    return data


def _same_hits(a, b):
    assert [[(h.chunk, h.score) for h in row] for row in a] == [[(h.chunk, h.score) for h in row] for row in b]


@pytest.fixture(scope="module")
def recipe():
    return mramg.load_dataset(demo_root(), "demo_recipe")


def test_saved_retriever_searches_identically_after_a_move(tmp_path, recipe):
    encoder = HashedBagOfWords()
    built = retriever_lib.Retriever.from_config(recipe.documents, encoder, _data())
    built.save(str(tmp_path / "a"))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    loaded = retriever_lib.Retriever.load(str(tmp_path / "b"), encoder)
    assert loaded.chunks == built.chunks and len(loaded.chunks) > len(recipe.documents)
    queries = [q.question for q in recipe.questions]
    _same_hits(loaded.search(queries, 10), built.search(queries, 10))
    assert loaded.chunks_of(recipe.questions[0].provenance[0]) == built.chunks_of(recipe.questions[0].provenance[0])


def test_load_rejects_a_mismatched_index(tmp_path, recipe):
    encoder = HashedBagOfWords()
    built = retriever_lib.Retriever.from_config(recipe.documents, encoder, _data())
    built.save(str(tmp_path))
    with open(tmp_path / retriever_lib.CHUNKS_FILE, encoding="utf-8") as f:
        lines = f.readlines()
    with open(tmp_path / retriever_lib.CHUNKS_FILE, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])
    with pytest.raises(ValueError, match=f"holds {len(lines)} vectors for {len(lines) - 1} chunks"):
        retriever_lib.Retriever.load(str(tmp_path), encoder)
    with pytest.raises(FileNotFoundError, match="chunks.jsonl"):
        retriever_lib.Retriever.load(str(tmp_path / "nowhere"), encoder)


def test_load_or_build_caches_and_rebuilds_when_stale(tmp_path, recipe):
    encoder = HashedBagOfWords()
    directory = str(tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="python -m m2io_jax.retrieval.build_index"):
        index_cache.load(directory, recipe.name, recipe.documents, _data(), encoder)
    lines = []
    first = index_cache.load_or_build(directory, _data(), encoder, [recipe], log=lines.append)
    again = index_cache.load_or_build(directory, _data(), encoder, [recipe], log=lines.append)
    assert "built" in lines[0] and "none cached" in lines[0] and "loaded" in lines[1]
    queries = [q.question for q in recipe.questions[:20]]
    _same_hits(again["demo_recipe"].search(queries, 5), first["demo_recipe"].search(queries, 5))

    with pytest.raises(ValueError, match="rebuild it with python -m m2io_jax.retrieval.build_index"):
        index_cache.load(directory, recipe.name, recipe.documents, _data(max_tokens=32), encoder)
    rebuilt = index_cache.load_or_build(directory, _data(max_tokens=32), encoder, [recipe], log=lines.append)
    assert "stale" in lines[2] and len(rebuilt["demo_recipe"].chunks) > len(first["demo_recipe"].chunks)

    edited = dict(recipe.documents)
    doc_id = next(iter(edited))
    edited[doc_id] = mramg.Document(doc_id, edited[doc_id].content + " Serve warm.", edited[doc_id].images,
                                    edited[doc_id].dataset)
    assert (index_cache.fingerprint(recipe.name, edited, _data(32))
            != index_cache.fingerprint(recipe.name, recipe.documents, _data(32)))


def test_command_writes_what_load_reads(tmp_path):
    out = str(tmp_path / "index")
    proc = subprocess.run(
        [sys.executable, "-m", "m2io_jax.retrieval.build_index", f"--config={ROOT}/configs/tiny.py",
         f"--out={out}", "--dataset=demo_recipe"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo_recipe: 30 documents" in proc.stdout
    with open(os.path.join(out, "demo_recipe", index_cache.MANIFEST), encoding="utf-8") as f:
        assert json.load(f)["documents"] == 30
    data = index_cache.data_section(_tiny_config())
    documents = index_cache.corpus_documents(data, "demo_recipe")
    encoder = sentence_encoder.load_encoder(data.retrieval.encoder_path)
    loaded = index_cache.load(out, "demo_recipe", documents, data, encoder)
    fresh = retriever_lib.Retriever.from_config(documents, encoder, data)
    assert loaded.chunks == fresh.chunks
    queries = ["How do I make the plum tart?", "What goes into the soup?"]
    ids = [[h.chunk for h in row] for row in loaded.search(queries, 3)]
    assert ids == [[h.chunk for h in row] for row in fresh.search(queries, 3)]
    np.testing.assert_allclose([[h.score for h in row] for row in loaded.search(queries, 3)],
                               [[h.score for h in row] for row in fresh.search(queries, 3)], rtol=1e-6)


def test_command_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "m2io_jax.retrieval.build_index"], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and "--out" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    unknown = subprocess.run([sys.executable, "-m", "m2io_jax.retrieval.build_index", f"--out={tmp_path}",
                              "--dataset=nope"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert unknown.returncode == 1 and "no dataset 'nope'" in unknown.stderr


def _tiny_config():
    from m2io_jax import cli

    return cli.load_config(f"{ROOT}/configs/tiny.py")
