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


class CompileCounter:
    """Counts the backend compilations of named jitted functions: `programs` maps each function's name (as
    `jax.jit` names it, e.g. "sampler_prefill") to the kind it counts as. Used by the sampler and the trainer."""

    def __init__(self, programs: dict[str, str]):
        self._kinds = {f"jit({name})": kind for name, kind in programs.items()}
        self.counts: collections.Counter[str] = collections.Counter()
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **metadata: str | int) -> None:
        kind = self._kinds.get(str(metadata.get("fun_name", "")))
        if event == BACKEND_COMPILE_EVENT and kind is not None:
            self.counts[kind] += 1


_SAMPLER = CompileCounter({"sampler_prefill": "prefill", "sampler_decode": "decode"})


def compile_count() -> int:
    """Number of sampler programs (prefill and decode) compiled in this process so far."""
    return sum(_SAMPLER.counts.values())


def compile_counts() -> dict[str, int]:
    """Sampler programs compiled so far, by kind ("prefill", "decode")."""
    return dict(_SAMPLER.counts)
