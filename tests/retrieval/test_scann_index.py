"""ScannIndex: exact below the threshold, high recall above it, save/load, and input errors."""

import numpy as np
import pytest

from m2io_jax.retrieval import index as index_lib


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, dim=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    return _unit(centers[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, dim)))


def _exact(db, q, k):
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def test_brute_force_is_exact():
    db, q = _clustered(500), _clustered(20, seed=1)
    index = index_lib.ScannIndex.build(db)
    assert index.kind == index_lib.BRUTE_FORCE
    ids, scores = index.search(q, 5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == (20, 5)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-5)
    np.testing.assert_allclose(scores, -np.sort(-(q @ db.T), axis=1)[:, :5], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_tree_ah_recall_and_overrides():
    config = index_lib.index_config()
    config.brute_force_below = 1000
    db, q = _clustered(4000), _clustered(300, seed=1)
    index = index_lib.ScannIndex.build(db, config)
    assert index.kind == index_lib.TREE_AH and index.num_leaves == round(2 * np.sqrt(4000))
    exact = _exact(db, q, 10)
    recall = lambda ids: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])  # noqa: E731
    assert recall(index.search(q, 10)[0]) >= 0.8  # hard 32-d data; the 100k benchmark reaches 0.99
    assert recall(index.search(q, 10, leaves_to_search=index.num_leaves, reorder=400)[0]) >= 0.99


def test_save_and_load(tmp_path):
    config = index_lib.index_config()
    config.brute_force_below = 1000
    for name, db in (("brute", _clustered(300)), ("tree", _clustered(2000))):
        index = index_lib.ScannIndex.build(db, config)
        index.save(str(tmp_path / name))
        moved = tmp_path / f"{name}_moved"
        (tmp_path / name).rename(moved)
        loaded = index_lib.ScannIndex.load(str(moved))
        assert (loaded.kind, loaded.num_vectors, loaded.dim) == (index.kind, index.num_vectors, index.dim)
        q = _clustered(10, seed=3)
        np.testing.assert_array_equal(loaded.search(q, 4)[0], index.search(q, 4)[0])


def test_errors(tmp_path):
    index = index_lib.ScannIndex.build(_clustered(10))
    with pytest.raises(ValueError, match="dimension 16; the index was built with dimension 32"):
        index.search(np.zeros((2, 16), np.float32), 3)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
        index.search(_clustered(2), 11)
    with pytest.raises(ValueError, match="zero embeddings"):
        index_lib.ScannIndex.build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="2-D array"):
        index_lib.ScannIndex.build(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index_lib.ScannIndex.build(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="apply to a tree index"):
        index.search(_clustered(2), 3, reorder=10)
    with pytest.raises(FileNotFoundError, match="m2io_index.json: missing"):
        index_lib.ScannIndex.load(str(tmp_path))
    assert index.search(np.zeros((0, 32), np.float32), 3)[0].shape == (0, 3)
