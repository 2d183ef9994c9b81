"""Runs a benchmark end to end at smoke size and checks the figures of its JSON summary (the last line)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any


def run_benchmark(name: str, *flags: str, timeout: int = 900) -> dict[str, Any]:
    """`python -m m2io_jax.bench.<name> <flags>` on CPU; returns the JSON object of its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", f"m2io_jax.bench.{name}", *flags], capture_output=True, text=True,
                         env={**env, "JAX_PLATFORMS": "cpu"}, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_positive_finite(figures: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Each of `keys` is present in `figures` and is a finite number above zero."""
    bad = {k: figures.get(k, "missing") for k in keys
           if not (isinstance(figures.get(k), (int, float)) and math.isfinite(figures[k]) and figures[k] > 0)}
    assert not bad, f"figures missing, non-finite or not positive: {bad}"
