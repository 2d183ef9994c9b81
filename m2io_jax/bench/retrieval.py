"""Retrieval index benchmark: ScaNN (our `ScannIndex`) against exact numpy and faiss `IndexFlatIP`.

    python -m m2io_jax.bench.retrieval [--num_vectors=100000] [--num_queries=2000] [--threads=2] [--nocurve]

Data: `num_vectors` x 384 vectors shaped like sentence embeddings (a shared mean direction, a mixture of
Gaussian clusters of varied spread, unit-normalised) and `num_queries` fresh queries from the same mixture;
then, if the demo corpus is present, the real MiniLM embeddings of its chunks and questions.
Measured: recall@10 against exact float32 search, and queries/s of batched search over all queries (best of
`--repeats`), with every library limited to `--threads` threads. The curve sweeps ScaNN's search-time
parameters (leaves_to_search, reorder) on the same index. The last line is one JSON object.
"""

from __future__ import annotations

import os

_THREADS_DEFAULT = 2
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads its BLAS
    os.environ.setdefault(_var, str(_THREADS_DEFAULT))

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from m2io_jax import cli  # noqa: E402
from m2io_jax.retrieval import index as index_lib  # noqa: E402

_NUM_VECTORS = flags.DEFINE_integer("num_vectors", 100_000, "synthetic database vectors")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 2_000, "synthetic queries")
_CLUSTERS = flags.DEFINE_integer("clusters", 1_000, "clusters of the synthetic mixture")
_THREADS = flags.DEFINE_integer("threads", _THREADS_DEFAULT,
                                "threads for numpy/faiss (BLAS env vars are read at import: set OMP_NUM_THREADS too)",
                                                          allow_override=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed searches per method (the best counts)", allow_override=True)
_CURVE = flags.DEFINE_bool("curve", True, "sweep ScaNN's search-time parameters on the synthetic set")
_DEMO = flags.DEFINE_bool("demo", True, "also measure the demo corpus's MiniLM embeddings")

K = 10


def sentence_like_vectors(n: int, dim: int, *, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors [n, dim]: a shared mean direction + cluster centre + per-cluster-scaled noise."""
    rng = np.random.default_rng(0)  # the mixture itself is fixed; `seed` only picks the samples
    mean = rng.normal(size=dim)
    mean /= np.linalg.norm(mean)
    centers = rng.normal(size=(clusters, dim)) / np.sqrt(dim)
    spread = rng.uniform(0.5, 1.0, size=clusters)
    sample = np.random.default_rng(seed)
    which = sample.integers(clusters, size=n)
    x = 0.5 * mean + centers[which] + spread[which, None] * sample.normal(size=(n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_search(db: np.ndarray, queries: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    """Exact top-k ids [Q, k] by float32 inner product: matmul + argpartition + sort of the k."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start : start + batch] @ db.T  # [b, N]
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out[start : start + batch] = np.take_along_axis(top, order, 1)
    return out


def recall_at_k(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(ids, exact)]))


def queries_per_second(fn: Callable[[], object], num_queries: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return num_queries / best


def faiss_flat_ip(db: np.ndarray, threads: int):
    import faiss  # benchmark-only dependency

    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatIP(db.shape[1])
    flat.add(db)
    return flat


def bench_set(name: str, db: np.ndarray, queries: np.ndarray, *, threads: int, repeats: int, curve: bool) -> dict:
    """All measurements on one (database, queries) pair; prints a table and returns the figures."""
    n, q = len(db), len(queries)
    exact = exact_search(db, queries, K)
    numpy_qps = queries_per_second(lambda: exact_search(db, queries, K), q, repeats)
    flat = faiss_flat_ip(db, threads)
    faiss_ids = flat.search(queries, K)[1]
    faiss_qps = queries_per_second(lambda: flat.search(queries, K), q, repeats)
    start = time.perf_counter()
    index = index_lib.ScannIndex.build(db)
    build_s = time.perf_counter() - start
    scann_ids = index.search(queries, K)[0]
    scann_qps = queries_per_second(lambda: index.search(queries, K), q, repeats)
    result = {
        "set": name, "num_vectors": n, "dim": db.shape[1], "num_queries": q, "index": index.kind,
        "num_leaves": index.num_leaves, "leaves_to_search": index.leaves_to_search, "reorder": index.config.reorder,
        "build_s": round(build_s, 2),
        "scann_recall": round(recall_at_k(scann_ids, exact), 4), "scann_qps": round(scann_qps),
        "numpy_qps": round(numpy_qps), "faiss_flat_qps": round(faiss_qps),
        "faiss_flat_recall": round(recall_at_k(faiss_ids, exact), 4),
    }
    result["scann_over_numpy"] = round(scann_qps / numpy_qps, 2)
    result["scann_over_faiss_flat"] = round(scann_qps / faiss_qps, 2)
    print(f"\n== {name}: {n} x {db.shape[1]}, {q} queries, k={K}, {threads} threads ==")
    print(f"{'method':<44} {'recall@10':>9} {'queries/s':>10} {'vs numpy':>9}")
    print(f"{'exact numpy (matmul + argpartition)':<44} {1.0:>9.4f} {numpy_qps:>10.0f} {1.0:>9.2f}")
    print(f"{'faiss IndexFlatIP (exact)':<44} {result['faiss_flat_recall']:>9.4f} {faiss_qps:>10.0f} "
          f"{faiss_qps / numpy_qps:>9.2f}")
    label = f"ScaNN {index.kind} (defaults), build {build_s:.1f} s"
    print(f"{label:<44} {result['scann_recall']:>9.4f} {scann_qps:>10.0f} {result['scann_over_numpy']:>9.2f}")
    if curve and index.kind == index_lib.TREE_AH:
        points = []
        print(f"\nScaNN recall / speed curve ({index.num_leaves} leaves):")
        print(f"{'leaves_to_search':>16} {'reorder':>8} {'recall@10':>9} {'queries/s':>10} {'vs numpy':>9} "
              f"{'vs faiss':>9}")
        for leaves in (4, 8, 16, 32, 64, 128):
            for reorder in (50, 100, 200):
                ids = index.search(queries, K, leaves_to_search=leaves, reorder=reorder)[0]
                qps = queries_per_second(lambda: index.search(queries, K, leaves_to_search=leaves, reorder=reorder),
                                         q, repeats)
                rec = recall_at_k(ids, exact)
                points.append({"leaves_to_search": leaves, "reorder": reorder, "recall": round(rec, 4),
                               "qps": round(qps)})
                print(f"{leaves:>16} {reorder:>8} {rec:>9.4f} {qps:>10.0f} {qps / numpy_qps:>9.2f} "
                      f"{qps / faiss_qps:>9.2f}")
        result["curve"] = points
    return result


def demo_embeddings() -> tuple[np.ndarray, np.ndarray] | None:
    """MiniLM embeddings of the demo corpus's chunks and questions, or None (with a message) if absent."""
    try:
        from m2io_jax.data import config as data_config
        from m2io_jax.data import demo, mramg
        from m2io_jax.models.sentence_encoder import load_encoder
        from m2io_jax.retrieval import chunking, retriever
    except ImportError as e:
        print(f"\n(demo corpus skipped: {e})")
        return None
    if not os.path.isdir(demo.CORPUS_DIR):
        print(f"\n(demo corpus skipped: {demo.CORPUS_DIR} does not exist)")
        return None
    encoder = load_encoder()
    max_tokens = data_config.get_config().chunk.max_tokens
    chunks, questions = [], []
    for name in demo.DEMO_DATASETS:
        dataset = mramg.load_dataset(demo.demo_root(), name, check_images=False)
        chunks += chunking.chunk_documents(dataset.documents.values(), max_tokens=max_tokens,
                                           length_fn=retriever.token_length_fn(encoder))
        questions += [q.question for q in dataset.questions]
    return encoder.encode([c.plain_text for c in chunks]), encoder.encode(questions)


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    threads, repeats = _THREADS.value, _REPEATS.value
    db = sentence_like_vectors(_NUM_VECTORS.value, 384, clusters=_CLUSTERS.value, seed=1)
    queries = sentence_like_vectors(_NUM_QUERIES.value, 384, clusters=_CLUSTERS.value, seed=2)
    results = [bench_set("synthetic", db, queries, threads=threads, repeats=repeats, curve=_CURVE.value)]
    demo = demo_embeddings() if _DEMO.value else None
    if demo is not None:
        results.append(bench_set("demo corpus (MiniLM)", *demo, threads=threads, repeats=repeats, curve=False))
    main_result = results[0]
    summary = {
        "benchmark": "retrieval",
        "threads": threads,
        "scann_recall_at_10": main_result["scann_recall"],
        "scann_qps": main_result["scann_qps"],
        "numpy_qps": main_result["numpy_qps"],
        "faiss_flat_qps": main_result["faiss_flat_qps"],
        "scann_over_numpy": main_result["scann_over_numpy"],
        "scann_over_faiss_flat": main_result["scann_over_faiss_flat"],
        "acceptance_met": main_result["scann_recall"] >= 0.95 and main_result["scann_over_numpy"] >= 10,
        "sets": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
