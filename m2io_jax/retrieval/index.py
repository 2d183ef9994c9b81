"""Maximum-inner-product search over passage embeddings with ScaNN.

Small corpora (below `brute_force_below` vectors) get exact brute-force search: at that size it is as fast as
anything approximate. Larger ones get ScaNN's partitioned search: a k-means tree (`num_leaves` partitions,
`leaves_to_search` probed per query), anisotropic vector quantisation (asymmetric hashing, AH) to score the
probed vectors cheaply, then exact re-scoring of the best `reorder` candidates. Embeddings are expected to be
L2-normalised, so inner product = cosine similarity.

    index = ScannIndex.build(embeddings)            # [N, D] float32
    ids, scores = index.search(queries, k=10)       # [Q, k] int64, [Q, k] float32, best first
    index.save(directory); ScannIndex.load(directory)
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import ml_collections
import numpy as np
import scann

_METADATA = "m2io_index.json"
_ASSETS = "scann_assets.pbtxt"
_ASSET_PATH = re.compile(r'asset_path: "([^"]*)"')
_FORMAT_VERSION = 1
BRUTE_FORCE = "brute_force"
TREE_AH = "tree_ah"


def index_config() -> ml_collections.ConfigDict:
    """Index parameters and their defaults (tuned with `python -m m2io_jax.bench.retrieval`).

    brute_force_below: exact search when the corpus has fewer vectors than this.
    num_leaves: k-means partitions; 0 picks round(2 * sqrt(N)).
    leaves_to_search: partitions probed per query; 0 picks ceil(num_leaves / 20).
    training_sample_size: vectors used to train the tree and the quantiser (capped at N); at 100k x 384 a
      50k sample cost 7 points of recall@10 against training on all vectors.
    dims_per_block: AH sub-space width (2 is ScaNN's recommendation for inner product).
    anisotropic_quantization_threshold: AH loss threshold for normalised vectors (ScaNN: 0.2).
    reorder: candidates re-scored exactly after AH (at least k are always re-scored).
    parallel_batch: query batch per thread in batched search; 0 searches on the calling thread only.
    """
    config = ml_collections.ConfigDict()
    config.brute_force_below = 20_000
    config.num_leaves = 0
    config.leaves_to_search = 0
    config.training_sample_size = 100_000
    config.dims_per_block = 2
    config.anisotropic_quantization_threshold = 0.2
    config.reorder = 100
    config.parallel_batch = 256
    return config


def _check_matrix(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}; the index was built with dimension {dim}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point; got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values (row {int(np.argwhere(~np.isfinite(x))[0, 0])})")
    return x


class ScannIndex:
    """A ScaNN searcher plus what is needed to check queries against it and to save it."""

    def __init__(self, searcher: Any, *, num_vectors: int, dim: int, kind: str, config: ml_collections.ConfigDict,
                 num_leaves: int = 0, leaves_to_search: int = 0):
        self._searcher = searcher
        self.num_vectors = num_vectors
        self.dim = dim
        self.kind = kind
        self.config = config
        self.num_leaves = num_leaves
        self.leaves_to_search = leaves_to_search

    @classmethod
    def build(cls, embeddings: np.ndarray, config: ml_collections.ConfigDict | None = None) -> ScannIndex:
        """Indexes `embeddings` [N, D] float32; `config` defaults to `index_config()`."""
        config = index_config() if config is None else config
        db = _check_matrix(embeddings, "embeddings")
        n, dim = db.shape
        if n == 0:
            raise ValueError("cannot build an index over zero embeddings")
        default_k = min(10, n)
        if n < config.brute_force_below:
            searcher = scann.scann_ops_pybind.builder(db, default_k, "dot_product").score_brute_force().build()
            return cls(searcher, num_vectors=n, dim=dim, kind=BRUTE_FORCE, config=config)
        num_leaves = config.num_leaves or max(2, round(2 * math.sqrt(n)))
        num_leaves = min(num_leaves, n)
        leaves_to_search = min(num_leaves, config.leaves_to_search or math.ceil(num_leaves / 20))
        searcher = (
            scann.scann_ops_pybind.builder(db, default_k, "dot_product")
            .tree(num_leaves=num_leaves, num_leaves_to_search=leaves_to_search,
                  training_sample_size=min(n, config.training_sample_size))
            .score_ah(config.dims_per_block,
                      anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
            .reorder(max(config.reorder, default_k))
            .build()
        )
        return cls(searcher, num_vectors=n, dim=dim, kind=TREE_AH, config=config,
                   num_leaves=num_leaves, leaves_to_search=leaves_to_search)

    def search(
        self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None, reorder: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for each query [Q, D] -> (ids [Q, k] int64, scores [Q, k] float32), best first.

        `leaves_to_search` and `reorder` override the built-in values for this call (tree index only).
        """
        q = _check_matrix(queries, "queries", self.dim)
        if not 1 <= k <= self.num_vectors:
            raise ValueError(f"k={k} must be in [1, {self.num_vectors}] (the number of indexed vectors)")
        if q.shape[0] == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        kwargs: dict[str, int] = {"final_num_neighbors": k}
        if self.kind == TREE_AH:
            kwargs["leaves_to_search"] = min(self.num_leaves, leaves_to_search or self.leaves_to_search)
            kwargs["pre_reorder_num_neighbors"] = max(k, reorder or self.config.reorder)
        elif leaves_to_search is not None or reorder is not None:
            raise ValueError("leaves_to_search / reorder apply to a tree index; this index is brute force")
        if self.config.parallel_batch and q.shape[0] > self.config.parallel_batch:
            ids, scores = self._searcher.search_batched_parallel(q, batch_size=self.config.parallel_batch, **kwargs)
        else:
            ids, scores = self._searcher.search_batched(q, **kwargs)
        return np.asarray(ids, np.int64), np.asarray(scores, np.float32)

    def save(self, directory: str) -> None:
        """Writes the ScaNN artefacts and `m2io_index.json` (sizes, kind, config) to `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._searcher.serialize(directory)
        assets = os.path.join(directory, _ASSETS)
        with open(assets, encoding="utf-8") as f:
            text = f.read()
        with open(assets, "w", encoding="utf-8") as f:  # ScaNN writes absolute paths; keep the directory movable
            f.write(_ASSET_PATH.sub(lambda m: f'asset_path: "{os.path.basename(m.group(1))}"', text))
        metadata = {
            "format_version": _FORMAT_VERSION,
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "kind": self.kind,
            "num_leaves": self.num_leaves,
            "leaves_to_search": self.leaves_to_search,
            "config": self.config.to_dict(),
        }
        with open(os.path.join(directory, _METADATA), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> ScannIndex:
        """Reads an index written by `save` (from wherever the directory was moved to)."""
        path = os.path.join(directory, _METADATA)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (not a directory written by ScannIndex.save)")
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {metadata.get('format_version')!r}; expected {_FORMAT_VERSION}")
        config = index_config()
        config.update(metadata["config"])
        with open(os.path.join(directory, _ASSETS), encoding="utf-8") as f:
            assets = _ASSET_PATH.sub(
                lambda m: f'asset_path: "{os.path.join(os.path.abspath(directory), os.path.basename(m.group(1)))}"',
                f.read()
            )
        searcher = scann.scann_ops_pybind.ScannSearcher(
            scann.scann_ops_pybind.scann_pybind.ScannNumpy(directory, assets), None
        )
        return cls(
            searcher,
            num_vectors=int(metadata["num_vectors"]),
            dim=int(metadata["dim"]),
            kind=metadata["kind"],
            config=config,
            num_leaves=int(metadata["num_leaves"]),
            leaves_to_search=int(metadata["leaves_to_search"]),
        )
