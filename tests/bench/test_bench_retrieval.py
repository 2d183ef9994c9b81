"""The index benchmark at smoke size: exact search agrees across libraries, and every figure is finite."""

import pytest

from tests.bench.smoke import assert_positive_finite, run_benchmark


@pytest.mark.slow
def test_retrieval_benchmark_smoke_run():
    result = run_benchmark("retrieval", "--num_vectors=3000", "--num_queries=200", "--clusters=30", "--repeats=1",
                           "--nocurve")
    synthetic, demo = result["sets"]
    assert (synthetic["num_vectors"], synthetic["num_queries"], synthetic["dim"]) == (3000, 200, 384)
    assert demo["set"] == "demo corpus (MiniLM)"
    for figures in (synthetic, demo):
        assert figures["faiss_flat_recall"] >= 0.999, figures  # faiss and numpy exact search find the same top 10
        assert 0.5 < figures["scann_recall"] <= 1, figures
        assert_positive_finite(figures, ["scann_qps", "numpy_qps", "faiss_flat_qps", "scann_over_numpy",
                                         "scann_over_faiss_flat"])
    assert demo["scann_recall"] >= 0.999  # the demo corpus is small enough for ScaNN's exact brute force
    assert result["scann_recall_at_10"] == synthetic["scann_recall"]
    assert isinstance(result["acceptance_met"], bool)
