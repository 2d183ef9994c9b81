"""The encoder benchmark at smoke size: both encoders give the same embeddings, and every figure is finite."""

import os
import subprocess
import sys

import pytest

from m2io_jax.bench.embed import cpu_description
from tests.bench.smoke import assert_positive_finite, run_benchmark


@pytest.mark.slow
def test_embed_benchmark_smoke_run():
    result = run_benchmark("embed", "--num_short=16", "--num_chunks=4", "--repeats=1", "--threads=1", "--pin",
                           "--op_rates")
    assert [(w["texts"], w["batch_size"]) for w in result["workloads"]] == [(16, 128), (4, 32)]
    for workload in result["workloads"]:
        assert workload["min_cosine"] > 0.9999, workload  # unit embeddings: same direction on both sides
        assert_positive_finite(workload, ["mean_tokens", "flax_sentences_per_s", "st_sentences_per_s", "ratio"])
    assert result["workloads"][1]["mean_tokens"] == 256  # passages are truncated to MiniLM's max_seq_length
    assert_positive_finite(result, ["short_ratio", "chunk_ratio"])
    assert isinstance(result["acceptance_met"], bool)
    assert result["pinned"] is True and result["cpu"]["cores"] == 1  # --pin with --threads=1: one core
    assert [op["op"].split()[0] for op in result["op_rates"]] == [
        "dense", "dense", "batched", "batched", "softmax", "GELU", "LayerNorm"]
    for op in result["op_rates"]:
        assert_positive_finite(op, ["xla", "torch", "ratio"])


def test_cpu_description_names_the_cores_this_process_may_use():
    cpu = cpu_description()
    assert cpu["cores"] == len(os.sched_getaffinity(0))
    assert cpu["isa"] in ("avx512f", "avx2", "avx", "other")
    assert cpu["model"]


def test_pin_to_more_cores_than_usable_is_a_one_line_error():
    too_many = len(os.sched_getaffinity(0)) + 1
    out = subprocess.run([sys.executable, "-m", "m2io_jax.bench.embed", f"--threads={too_many}", "--pin"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode != 0
    assert f"--threads={too_many} with --pin" in out.stderr.strip().splitlines()[-1]
