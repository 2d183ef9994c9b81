"""Token selection: top-k / top-p filtering, greedy or sampled choice, and per-row random keys.

Pure functions of logits and keys, importable without the rest of the sampler (the trainer and tests use them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(scaled: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Sets to -inf every logit outside the top-k, then outside the top-p nucleus. scaled [M, V] float32.

    The nucleus keeps the smallest set of highest-probability tokens (after top-k, renormalised) whose
    probability mass reaches top_p; the most likely token is always kept.
    """
    if top_k is None and (top_p is None or top_p >= 1.0):
        return scaled
    if top_k is not None:
        ranked = jax.lax.top_k(scaled, top_k)[0]  # [M, k], descending
    else:
        ranked = -jnp.sort(-scaled, axis=-1)  # [M, V], descending
    threshold = ranked[:, -1:]
    if top_p is not None and top_p < 1.0:
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(scaled < threshold, -jnp.inf, scaled)


def choose_tokens(
    logits: jax.Array, keys: jax.Array, step: jax.Array, *, temperature: float, top_k: int | None,
    top_p: float | None,
) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row. logits [M, V] f32, keys [M] (per-row keys) -> tokens [M], logprobs [M].

    Greedy when temperature == 0 (log-probs at temperature 1); otherwise a categorical draw from the filtered
    logits / temperature with key fold_in(row key, step). Log-probs are of the unfiltered tempered softmax.
    """
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_logits(scaled, top_k, top_p)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tokens = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def row_keys(seed: jax.Array, prompt_index: jax.Array, sample_index: jax.Array) -> jax.Array:
    """Keys [R, G]: fold_in(fold_in(key(seed), prompt_index[r]), sample_index[r, g])."""
    base = jax.random.key(seed)
    per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, prompt_index)  # [R]
    return jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), in_axes=(0, 0))(per_prompt, sample_index)
