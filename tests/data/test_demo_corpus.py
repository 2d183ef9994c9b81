"""The demo corpus: regenerated deterministically, matching what is committed, and rich enough to learn from."""

import hashlib
import os

import numpy as np
from PIL import Image

from m2io_jax.data import mramg
from m2io_jax.data.demo import CORPUS_DIR, DEMO_DATASETS, build


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, root)] = path
    return out


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_regeneration_is_deterministic_and_matches_committed(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build.generate(a)
    build.generate(b)
    files_a, files_b, committed = _files(a), _files(b), _files(CORPUS_DIR)
    assert files_a.keys() == files_b.keys() == committed.keys()
    for rel, path in files_a.items():
        assert _digest(path) == _digest(files_b[rel]), rel
        if rel.endswith(".png"):  # PNG bytes may differ with the zlib build; pixels may not
            np.testing.assert_array_equal(
                np.asarray(Image.open(path)), np.asarray(Image.open(committed[rel])), err_msg=rel
            )
        else:
            assert _digest(path) == _digest(committed[rel]), (
                f"{rel}: regenerate with python -m m2io_jax.data.demo.generate"
            )


def test_demo_is_clean_and_varied():
    total_questions = 0
    for name in DEMO_DATASETS:
        ds = mramg.load_dataset(CORPUS_DIR, name, strict=True)
        assert ds.report.answer_marker_form == mramg.FORM_PIC
        counts = {len(q.images) for q in ds.questions}
        assert 0 in counts and max(counts) >= 2  # questions with no, one and several images
        for q in ds.questions:
            assert len(q.anchors) == len(q.images)
            doc_images = {i for d in q.provenance for i in ds.documents[d].images}
            assert set(q.images) <= doc_images
            if q.images and len(q.provenance) == 1:
                assert len(doc_images) > len(q.images) or name == "demo_web"  # distractors in the same document
        total_questions += len(ds.questions)
    assert total_questions >= 200
    size = sum(os.path.getsize(p) for p in _files(CORPUS_DIR).values())
    assert size < 2_000_000
