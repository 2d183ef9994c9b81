"""The vision benchmark runs end to end and prints its figures as one JSON object on the last line."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_vision_benchmark_prints_json():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "m2io_jax.bench.vision", "--images", "2", "--size", "224",
                          "--iters", "1"], check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 2 and result["speedup"] > 0
    assert result["max_abs_diff"] < 1e-4
