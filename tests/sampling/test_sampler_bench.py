"""The sampler benchmark runs end to end on a tiny model and ends with its JSON summary line."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sampler_benchmark_tiny_end_to_end():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "m2io_jax.bench.sampler", "--size", "tiny", "--workloads", "32x16"],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["tokens_per_s"]) == {"m2io_jax", "transformers", "tunix"}
    assert result["ratios"]["vs_transformers"] > 0 and result["flop_ceiling"] > 1
