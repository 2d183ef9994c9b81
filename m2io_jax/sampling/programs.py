"""The sampler's two device programs: prefill (prompts once, first tokens) and the decode loop.

Prefill runs every prompt once through the model (`CausalLM.prefill`, vision tower included), samples the first
token of its G samples and allocates their suffix caches. Decoding is one jitted `lax.while_loop` over a donated
`DecodeState` (tokens, log-probs, suffix cache, done flags, per-row keys): no host round trip per token, early
exit when every row is done. The loop is split into a few stages with static suffix lengths (N/4, N/2, N) so
that attention reads only the suffix slots written so far, rounded up to the stage.

Both talk to the model only through the `CausalLM` protocol (m2io_jax.models.protocol).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m2io_jax import sharding as shd
from m2io_jax.models.protocol import PrefixCache, PreparedInputs, SuffixCache, suppress_logits
from m2io_jax.sampling.tokens import choose_tokens, row_keys


def decode_stages(num_new: int) -> tuple[int, ...]:
    """Static suffix lengths of the decode stages: attention in stage s reads only the first stages[s] slots."""
    if num_new < 64:
        return (num_new,)
    return (num_new // 4, num_new // 2, num_new)


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries (donated to the decode program)."""

    step: jax.Array  # [] int32: tokens sampled so far (the last one is tokens[..., step - 1])
    tokens: jax.Array  # [R, G, N] int32
    logprobs: jax.Array  # [R, G, N] float32
    lengths: jax.Array  # [R, G] int32: tokens emitted (stop token included)
    done: jax.Array  # [R, G] bool
    max_new: jax.Array  # [R, G] int32: per-row budget
    keys: jax.Array  # [R, G] typed PRNG keys
    suffix: SuffixCache  # [L, R, G, N, KV, hd] keys and values of the generated tokens


@dataclasses.dataclass(frozen=True)
class SamplerProgram:
    """Static (hashable) description of one compiled sampler: the model graph and the sampling settings.

    suppress_tokens: never sampled; masked before the log-softmax (`protocol.suppress_logits`), as the trainer's
    `completion_logprobs` masks them.
    """

    graphdef: Any
    num_samples: int
    num_new: int
    temperature: float
    top_k: int | None
    top_p: float | None
    suppress_tokens: tuple[int, ...] = ()


def _record(state: DecodeState, emitted: jax.Array, logp: jax.Array, stop_tokens: jax.Array,
            slot: jax.Array) -> DecodeState:
    """Writes the tokens chosen at `slot` ([R, G]) and updates lengths / done flags."""
    live = ~state.done
    lengths = state.lengths + live.astype(jnp.int32)
    stopped = jnp.isin(emitted, stop_tokens) & live
    done = state.done | stopped | (lengths >= state.max_new)
    tokens = jax.lax.dynamic_update_slice(state.tokens, emitted[:, :, None], (0, 0, slot))
    logprobs = jax.lax.dynamic_update_slice(state.logprobs, logp[:, :, None], (0, 0, slot))
    return state.replace(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done, step=slot + 1)


def _choose(program: SamplerProgram, logits: jax.Array, keys: jax.Array, step: jax.Array,
            ) -> tuple[jax.Array, jax.Array]:
    """choose_tokens over logits [R, G, V] with keys [R, G] -> tokens, log-probs [R, G]."""
    r, g, v = logits.shape
    logits = suppress_logits(logits, program.suppress_tokens)
    tokens, logp = choose_tokens(logits.reshape(r * g, v), keys.reshape(r * g), step,
                                 temperature=program.temperature, top_k=program.top_k, top_p=program.top_p)
    return tokens.reshape(r, g), logp.reshape(r, g)


def sampler_prefill(program: SamplerProgram, params: nnx.State, inputs: PreparedInputs, prompt_index: jax.Array,
                    sample_index: jax.Array, max_new: jax.Array, stop_tokens: jax.Array,
                    seed: jax.Array, vision_features: jax.Array | None = None) -> tuple[PrefixCache, DecodeState]:
    """Runs every prompt once, samples the first token of its G samples and allocates their suffix caches.

    prompt_index [R], sample_index [R, G] and seed fix each row's key; max_new [R, G] is its token budget.
    vision_features: the prompts' image features when the caller computed them (else the tower runs here).
    """
    model = nnx.merge(program.graphdef, params)
    r = inputs.ids.shape[0]
    g, n = program.num_samples, program.num_new
    logits, prefix = model.prefill(inputs, vision_features)  # [R, V]
    keys = row_keys(seed, prompt_index, sample_index)  # [R, G]
    first, logp = _choose(program, jnp.broadcast_to(logits[:, None], (r, g, logits.shape[-1])), keys, jnp.int32(0))
    state = DecodeState(
        step=jnp.int32(0), tokens=jnp.zeros((r, g, n), jnp.int32), logprobs=jnp.zeros((r, g, n), jnp.float32),
        lengths=jnp.zeros((r, g), jnp.int32), done=jnp.zeros((r, g), bool), max_new=max_new, keys=keys,
        suffix=model.init_suffix_cache(r, g, n))
    return prefix, _record(state, first, logp, stop_tokens, jnp.int32(0))


def _decode_step(program: SamplerProgram, model: Any, prefix: PrefixCache, stop_tokens: jax.Array, span: int,
                 state: DecodeState) -> DecodeState:
    """Feeds the last sampled token of every row, attends over prefix + suffix[:span], samples the next one."""
    slot = state.step - 1  # suffix slot of the token fed now
    last = jax.lax.dynamic_index_in_dim(state.tokens, slot, axis=2, keepdims=False)  # [R, G]
    logits, suffix = model.decode_step(last, prefix, state.suffix, slot, span=span)  # [R, G, V]
    tokens, logp = _choose(program, logits, state.keys, state.step)
    return _record(state.replace(suffix=suffix), tokens, logp, stop_tokens, state.step)


def sampler_decode(program: SamplerProgram, params: nnx.State, prefix: PrefixCache, stop_tokens: jax.Array,
                   state: DecodeState) -> DecodeState:
    """Decodes until every row is done or N tokens exist, in stages of growing static suffix span."""
    model = nnx.merge(program.graphdef, params)
    n = program.num_new
    for span in decode_stages(n):
        def cond(s: DecodeState, span=span) -> jax.Array:
            return (s.step < n) & (s.step <= span) & jnp.any(~s.done)

        body = functools.partial(_decode_step, program, model, prefix, stop_tokens, span)
        state = jax.lax.while_loop(cond, body, state)
    return state


prefill_jit = shd.LockstepJit(sampler_prefill, static_argnums=(0,))
decode_jit = shd.LockstepJit(sampler_decode, static_argnums=(0,), donate_argnums=(4,))
