"""The encoder benchmark at smoke size: both encoders give the same embeddings, and every figure is finite."""

import pytest

from tests.bench.smoke import assert_positive_finite, run_benchmark


@pytest.mark.slow
def test_embed_benchmark_smoke_run():
    result = run_benchmark("embed", "--num_short=16", "--num_chunks=4", "--repeats=1", "--threads=1")
    assert [(w["texts"], w["batch_size"]) for w in result["workloads"]] == [(16, 128), (4, 32)]
    for workload in result["workloads"]:
        assert workload["min_cosine"] > 0.9999, workload  # unit embeddings: same direction on both sides
        assert_positive_finite(workload, ["mean_tokens", "flax_sentences_per_s", "st_sentences_per_s", "ratio"])
    assert result["workloads"][1]["mean_tokens"] == 256  # passages are truncated to MiniLM's max_seq_length
    assert_positive_finite(result, ["short_ratio", "chunk_ratio"])
    assert isinstance(result["acceptance_met"], bool)
