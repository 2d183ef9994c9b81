"""Counts the sampler's real XLA compilations, from jax's backend-compile monitoring events.

jax records `/jax/core/compile/backend_compile_duration` (with the jitted function's name) each time it needs an
executable it does not hold in memory, whether ahead of time (`.lower().compile()`) or at a call with new
shapes, and compiles it or loads it from the persistent compilation cache; a call that reuses an executable
records nothing. Python traces are not counted.
"""

from __future__ import annotations

import collections

from jax import monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

PROGRAMS = {"jit(sampler_prefill)": "prefill", "jit(sampler_decode)": "decode"}
"""The jitted sampler functions (as jax names them in the event) and the kind each counts as."""

_COMPILES: collections.Counter[str] = collections.Counter()


def _on_event(event: str, duration_secs: float, **metadata: str | int) -> None:
    kind = PROGRAMS.get(str(metadata.get("fun_name", "")))
    if event == BACKEND_COMPILE_EVENT and kind is not None:
        _COMPILES[kind] += 1


monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """Number of sampler programs (prefill and decode) compiled in this process so far."""
    return sum(_COMPILES.values())


def compile_counts() -> dict[str, int]:
    """Sampler programs compiled so far, by kind ("prefill", "decode")."""
    return dict(_COMPILES)
