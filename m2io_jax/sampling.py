"""Batched KV-cache sampler with shared-prefix group sampling (GRPO's "prefill once, sample G").

`generate(model, prompts, num_samples=G, ...)` prefills each prompt once and decodes its G samples against
that one prompt cache: the prompt's keys and values live in a *shared prefix cache* `[L, B, P, KV, hd]` and
every sample only owns a *suffix cache* `[L, B, G, N, KV, hd]` for the tokens it generates. A decode step
attends each sample's query to the shared prefix (one batched matrix product per prompt, instead of G
matrix-vector products over G copies) and to its own suffix; both score blocks go through one softmax, so the
result is exactly attention over prompt + completion. Peers (transformers `generate`, tunix) prefill the
prompt G times and keep G copies of its cache.

Decoding is one jitted `lax.while_loop` over a donated `DecodeState` (tokens, log-probs, suffix cache, done
flags, per-row keys): no host round trip per token, early exit when every row is done. The loop is split into
a few stages with static suffix lengths (N/4, N/2, N) so that attention reads only the suffix slots written so
far, rounded up to the stage.

Randomness: row (prompt p, sample g) uses `fold_in(fold_in(key(seed), p), g)` folded with the step, so tokens
do not depend on batch composition and `generate(num_samples=G)` equals `generate_repeated` (the prompt
prefilled G times) token for token.

Log-probabilities are those the trainer recomputes: `log_softmax(logits / temperature)` of the chosen token,
before top-k / top-p filtering (temperature 1 when greedy).

Shapes are bucketed (prompt length, batch and generation length to powers of two, or to `Buckets` lists), so
repeated calls reuse compiled programs; `compile_count()` counts the programs traced so far.

On a mesh (parameters carrying `NamedSharding`s), the parameters are placed once per call in the sampling
layout (`sampling_rules`: the fsdp axis dropped from parameter dimensions, tensor parallelism kept), the batch
is sharded over data/fsdp, and the decode loop never gathers weights.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding

from m2io_jax import sharding as shd
from m2io_jax.buckets import bucket_size
from m2io_jax.models.qwen2 import attention_residual_and_mlp, project_qkv, rms_norm, rope_cos_sin

# -------------------------------------------------------------------------------------------------- buckets


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static sizes the sampler pads to. A None list means powers of two, at least the given minimum."""

    prompt_lengths: tuple[int, ...] | None = None
    new_token_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    min_prompt_length: int = 16
    min_new_tokens: int = 16
    min_batch_size: int = 1


DEFAULT_BUCKETS = Buckets()


def decode_stages(num_new: int) -> tuple[int, ...]:
    """Static suffix lengths of the decode stages: attention in stage s reads only the first stages[s] slots."""
    if num_new < 64:
        return (num_new,)
    return (num_new // 4, num_new // 2, num_new)


# -------------------------------------------------------------------------------------------- compile stats

_TRACES: collections.Counter[str] = collections.Counter()


def compile_count() -> int:
    """Number of sampler programs (prefill and decode) traced and compiled in this process so far."""
    return sum(_TRACES.values())


def compile_counts() -> dict[str, int]:
    """Programs traced so far, by kind ("prefill", "decode")."""
    return dict(_TRACES)


# ----------------------------------------------------------------------------------------- token selection


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


# ------------------------------------------------------------------------------------------- decode state


@struct.dataclass
class PrefixCache:
    """Keys and values of the prompts, shared by all samples of a prompt."""

    k: jax.Array  # [L, R, P, KV, hd]
    v: jax.Array  # [L, R, P, KV, hd]
    mask: jax.Array  # [R, P] bool, False on left padding
    next_position: jax.Array  # [R] int32: position of the first generated token (M-RoPE: + rope_deltas)


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
    suffix_k: jax.Array  # [L, R, G, N, KV, hd]
    suffix_v: jax.Array  # [L, R, G, N, KV, hd]


@struct.dataclass
class PromptBatch:
    """Left-padded prompts as the prefill program takes them (built on the host)."""

    ids: jax.Array  # [R, P] int32
    mask: jax.Array  # [R, P] int32, 0 on padding
    positions: jax.Array  # [R, P] (RoPE) or [3, R, P] (M-RoPE)
    next_position: jax.Array  # [R] int32: position of the first generated token
    image_index: jax.Array | None = None  # [R, P] int32: vision feature row of each image token, else -1
    vision: Any = None  # VisionInputs of all images of the batch, or None


@dataclasses.dataclass(frozen=True)
class _Program:
    """Static (hashable) description of one compiled sampler: the model graph and the sampling settings."""

    graphdef: Any
    num_samples: int
    num_new: int
    temperature: float
    top_k: int | None
    top_p: float | None


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


# ------------------------------------------------------------------------------------------------- prefill


def _language_model(model: nnx.Module) -> nnx.Module:
    """The Qwen2 decoder of a text model (itself) or of a vision-language model (its `language_model`)."""
    return getattr(model, "language_model", model)


def _prefill(program: _Program, params: nnx.State, prompts: PromptBatch, prompt_index: jax.Array,
             sample_index: jax.Array, max_new: jax.Array, stop_tokens: jax.Array,
             seed: jax.Array) -> tuple[PrefixCache, DecodeState]:
    """Runs every prompt once (vision tower included), samples the first token of its G samples and allocates
    their suffix caches."""
    _TRACES["prefill"] += 1
    model = nnx.merge(program.graphdef, params)
    lm = _language_model(model)
    c = lm.config
    r, p = prompts.ids.shape
    g, n = program.num_samples, program.num_new
    if prompts.vision is None:
        embeds = lm.embed(prompts.ids)
    else:
        embeds = model.embed(prompts.ids, image_token_index=prompts.image_index, vision=prompts.vision)
    hidden, cache = lm.forward(embeds, positions=prompts.positions, segment_ids=prompts.mask,
                               cache=lm.init_cache(r, p))
    logits = jnp.einsum("rd,dv->rv", hidden[:, -1], lm.lm_head_weight(), preferred_element_type=jnp.float32)
    keys = row_keys(seed, prompt_index, sample_index)  # [R, G]
    logits = jnp.broadcast_to(logits[:, None], (r, g, logits.shape[-1])).reshape(r * g, -1)
    first, logp = choose_tokens(logits, keys.reshape(-1), jnp.int32(0), temperature=program.temperature,
                                top_k=program.top_k, top_p=program.top_p)
    suffix_shape = (c.num_hidden_layers, r, g, n, c.num_key_value_heads, c.head_dim)
    suffix = shd.constrain(jnp.zeros(suffix_shape, cache.k.dtype),
                           ("layers", "batch", None, "cache_length", "act_kv_heads", None))
    state = DecodeState(
        step=jnp.int32(0), tokens=jnp.zeros((r, g, n), jnp.int32), logprobs=jnp.zeros((r, g, n), jnp.float32),
        lengths=jnp.zeros((r, g), jnp.int32), done=jnp.zeros((r, g), bool), max_new=max_new, keys=keys,
        suffix_k=suffix, suffix_v=suffix)
    state = _record(state, first.reshape(r, g), logp.reshape(r, g), stop_tokens, jnp.int32(0))
    prefix = PrefixCache(k=cache.k, v=cache.v, mask=prompts.mask.astype(bool), next_position=prompts.next_position)
    return prefix, state


# -------------------------------------------------------------------------------------------------- decode


def shared_prefix_attention(
    q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array, suffix_k: jax.Array,
    suffix_v: jax.Array, suffix_mask: jax.Array,
) -> jax.Array:
    """Attention of G samples' queries to their prompt's shared prefix and to their own suffix.

    q [R, G, H, hd]; prefix_k/v [R, P, KV, hd], prefix_mask [R, P]; suffix_k/v [R, G, S, KV, hd],
    suffix_mask [S] -> [R, G, H, hd]. One softmax over prefix and suffix scores (float32).
    """
    r, g, h, hd = q.shape
    kv = prefix_k.shape[2]
    q = q.reshape(r, g, kv, h // kv, hd)
    scale = hd ** -0.5
    low = jnp.finfo(jnp.float32).min
    s_pre = jnp.einsum("rgkqd,rpkd->rkgqp", q, prefix_k, preferred_element_type=jnp.float32) * scale
    s_suf = jnp.einsum("rgkqd,rgskd->rkgqs", q, suffix_k, preferred_element_type=jnp.float32) * scale
    s_pre = jnp.where(prefix_mask[:, None, None, None, :], s_pre, low)
    s_suf = jnp.where(suffix_mask[None, None, None, None, :], s_suf, low)
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_suf], axis=-1), axis=-1).astype(prefix_v.dtype)
    p = prefix_k.shape[1]
    out = (jnp.einsum("rkgqp,rpkd->rgkqd", probs[..., :p], prefix_v)
           + jnp.einsum("rkgqs,rgskd->rgkqd", probs[..., p:], suffix_v))
    return out.reshape(r, g, h, hd)


def _decode_step(program: _Program, model: nnx.Module, prefix: PrefixCache, stop_tokens: jax.Array,
                 span: int, state: DecodeState) -> DecodeState:
    """Feeds the last sampled token of every row, attends over prefix + suffix[:span], samples the next one."""
    c = model.config
    r, g, _ = state.tokens.shape
    m = r * g
    slot = state.step - 1  # suffix slot of the token fed now
    last = jax.lax.dynamic_index_in_dim(state.tokens, slot, axis=2, keepdims=False)  # [R, G]
    positions = jnp.broadcast_to(prefix.next_position[:, None] + slot, (r, g)).reshape(m, 1)  # [M, 1]
    if c.mrope_section is not None:
        positions = jnp.broadcast_to(positions[None], (3, m, 1))
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)
    x = model.embed(last.reshape(m, 1))  # [M, 1, D]
    suffix_mask = jnp.arange(span) <= slot  # [span]
    weights = model.layers.stacked(c.dtype)

    def layer(carry, xs):
        x, sk_all, sv_all = carry
        w, pk, pv, i = xs
        q, k, v = project_qkv(c, x, w, cos, sin)  # [M, 1, H, hd], [M, 1, KV, hd] x2
        new_k = k.reshape(1, r, g, 1, *k.shape[2:]).astype(sk_all.dtype)
        new_v = v.reshape(1, r, g, 1, *v.shape[2:]).astype(sv_all.dtype)
        sk_all = jax.lax.dynamic_update_slice(sk_all, new_k, (i, 0, 0, slot, 0, 0))
        sv_all = jax.lax.dynamic_update_slice(sv_all, new_v, (i, 0, 0, slot, 0, 0))
        sk = jax.lax.dynamic_index_in_dim(sk_all, i, axis=0, keepdims=False)[:, :, :span]  # [R, G, span, KV, hd]
        sv = jax.lax.dynamic_index_in_dim(sv_all, i, axis=0, keepdims=False)[:, :, :span]
        q = shd.constrain(q.reshape(r, g, *q.shape[2:]), ("batch", None, "act_heads", None))
        out = shared_prefix_attention(q, pk, pv, prefix.mask, sk.astype(q.dtype), sv.astype(q.dtype), suffix_mask)
        x = attention_residual_and_mlp(c, x, w, out.reshape(m, 1, *out.shape[2:]))
        return (shd.constrain(x, ("batch", "length", "act_embed")), sk_all, sv_all), None

    layer_ids = jnp.arange(c.num_hidden_layers)
    (x, sk_all, sv_all), _ = jax.lax.scan(
        layer, (x, state.suffix_k, state.suffix_v), (weights, prefix.k, prefix.v, layer_ids))
    hidden = rms_norm(x[:, 0], model.norm[...], c.rms_norm_eps)  # [M, D]
    logits = jnp.einsum("md,dv->mv", hidden, model.lm_head_weight(), preferred_element_type=jnp.float32)
    tokens, logp = choose_tokens(logits, state.keys.reshape(m), state.step, temperature=program.temperature,
                                 top_k=program.top_k, top_p=program.top_p)
    state = state.replace(suffix_k=sk_all, suffix_v=sv_all)
    return _record(state, tokens.reshape(r, g), logp.reshape(r, g), stop_tokens, state.step)


def _decode(program: _Program, params: nnx.State, prefix: PrefixCache, stop_tokens: jax.Array,
            state: DecodeState) -> DecodeState:
    """Decodes until every row is done or N tokens exist, in stages of growing static suffix span."""
    _TRACES["decode"] += 1
    model = _language_model(nnx.merge(program.graphdef, params))
    n = program.num_new
    for span in decode_stages(n):
        def cond(s: DecodeState, span=span) -> jax.Array:
            return (s.step < n) & (s.step <= span) & jnp.any(~s.done)

        body = functools.partial(_decode_step, program, model, prefix, stop_tokens, span)
        state = jax.lax.while_loop(cond, body, state)
    return state


_prefill_jit = jax.jit(_prefill, static_argnums=(0,))
_decode_jit = jax.jit(_decode, static_argnums=(0,), donate_argnums=(4,))


# ------------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass
class SampleOutput:
    """Samples of `generate`: row i is sample `sample_index[i]` of prompt `prompt_index[i]`.

    Samples of one prompt are adjacent. `tokens[i]` are the new token ids (a stop token, when hit, included);
    `logprobs[i][t]` is log softmax(logits / temperature) of `tokens[i][t]` (temperature 1 when greedy).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    prompt_index: list[int]
    sample_index: list[int]


def _text_config(model: nnx.Module) -> Any:
    return _language_model(model).config


def _validate(model: Any, prompts: Any, max_new_tokens: int, num_samples: int, temperature: float,
              top_k: int | None, top_p: float | None, stop_tokens: Sequence[int]) -> list[list[int]]:
    """Checks the request on the host, before anything is compiled; returns the prompts as int lists."""
    c = _text_config(model)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and not 1 <= top_k <= c.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={c.vocab_size}]; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompts[{i}] must be a flat list of int token ids; got array of shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = np.flatnonzero((ids < 0) | (ids >= c.vocab_size))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"prompts[{i}][{j}] = {int(ids[j])} is outside the vocabulary [0, {c.vocab_size})")
        if ids.size + max_new_tokens > c.max_position_embeddings:
            raise ValueError(f"prompts[{i}] has {ids.size} tokens; with max_new_tokens={max_new_tokens} it needs "
                             f"{ids.size + max_new_tokens} cache slots, more than the model's "
                             f"max_position_embeddings={c.max_position_embeddings}")
        out.append([int(t) for t in ids])
    for t in stop_tokens:
        if not 0 <= int(t) < c.vocab_size:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {c.vocab_size})")
    return out


def _image_arrays(item: Any, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixel_values, image_grid_thw) of one prompt's processor output (a mapping or an object), or None."""
    if item is None:
        return None
    get = item.get if isinstance(item, dict) else functools.partial(getattr, item)
    try:
        pixels, grid = get("pixel_values"), get("image_grid_thw")
    except (KeyError, AttributeError) as e:
        raise ValueError(f"{where}: expected the processor output of one prompt with 'pixel_values' and "
                         f"'image_grid_thw'; got {type(item).__name__}") from e
    if pixels is None or grid is None:
        return None
    return np.asarray(pixels, np.float32), np.asarray(grid, np.int64).reshape(-1, 3)


def _check_images(model: nnx.Module, prompts: list[list[int]], images: Any) -> list[Any] | None:
    """Validates `images` against the model and the prompts; returns one item (or None) per prompt."""
    if images is None:
        return None
    if not hasattr(model, "language_model"):
        raise ValueError(f"images were given but {type(model).__name__} is a text-only model")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != len(prompts):
        raise ValueError(f"images must be a list with one processor output (or None) per prompt: "
                         f"{len(prompts)} prompts")
    from m2io_jax.models.qwen2_5_vl import num_image_tokens

    config = model.config
    for i, (prompt, item) in enumerate(zip(prompts, images)):
        arrays = _image_arrays(item, f"images[{i}]")
        found = sum(t == config.image_token_id for t in prompt)
        needed = 0 if arrays is None else int(num_image_tokens(arrays[1], config.vision.spatial_merge_size).sum())
        if found != needed:
            raise ValueError(f"prompts[{i}] holds {found} image tokens (id {config.image_token_id}) but images[{i}] "
                             f"gives {needed} vision features")
    return list(images)


def _prompt_batch(model: nnx.Module, prompts: list[list[int]], images: list[Any] | None, rows: int,
                  length: int) -> PromptBatch:
    """Left-pads `prompts` to [rows, length] (extra rows: one-token dummies) with positions; numpy arrays."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = prompt
        mask[i, length - len(prompt):] = 1
    mask[len(prompts):, -1] = 1
    lengths = mask.sum(axis=-1).astype(np.int32)
    if not hasattr(model, "language_model"):
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
        return PromptBatch(ids=ids, mask=mask, positions=positions, next_position=lengths)
    from m2io_jax.models.qwen2_5_vl import prepare_inputs

    found = [a for a in (_image_arrays(x, f"images[{i}]") for i, x in enumerate(images or [])) if a is not None]
    pixels = np.concatenate([a[0] for a in found]) if found else None
    grid = np.concatenate([a[1] for a in found]) if found else None
    inputs = prepare_inputs(model.config, ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    return PromptBatch(ids=ids, mask=mask, positions=inputs.positions, next_position=lengths + inputs.rope_deltas,
                       image_index=inputs.image_token_index, vision=inputs.vision)


def sampling_rules(rules: shd.Rules | None = None) -> shd.Rules:
    """The logical-axis rules for sampling: parameters lose the fsdp axis (no all-gather per token)."""
    activations = {"batch", "length", "cache_length"}
    out = []
    for name, axes in (shd.current_rules() if rules is None else rules):
        if name not in activations and not name.startswith("act_") and axes is not None:
            kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a != "fsdp")
            axes = kept or None
        out.append((name, axes))
    return tuple(out)


def _mesh_of(params: nnx.State) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def sampling_params(model: nnx.Module) -> tuple[Any, nnx.State, jax.sharding.Mesh | None]:
    """(graphdef, parameters in the sampling layout, mesh or None): resharded once per call, not per token."""
    graphdef, params = nnx.split(model)
    mesh = _mesh_of(params)
    if mesh is not None:
        params = jax.device_put(params, shd.state_shardings(params, mesh, sampling_rules()))
    return graphdef, params, mesh


def _sample(model: nnx.Module, prompts: list[list[int]], images: list[Any] | None, prompt_index: np.ndarray,
            sample_index: np.ndarray, *, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, stop_tokens: Sequence[int], seed: int, buckets: Buckets,
            compile_only: bool = False) -> SampleOutput | None:
    """Prefills rows `prompts` once each and decodes sample_index.shape[1] samples per row.

    With compile_only, compiles the prefill and decode programs of this request's buckets and runs nothing.
    """
    rows, g = sample_index.shape
    p = bucket_size(max(len(x) for x in prompts), buckets.prompt_lengths, buckets.min_prompt_length, "prompt length")
    n = bucket_size(max_new_tokens, buckets.new_token_lengths, buckets.min_new_tokens, "max_new_tokens")
    r = bucket_size(rows, buckets.batch_sizes, buckets.min_batch_size, "batch size")
    batch = _prompt_batch(model, prompts, images, r, p)
    graphdef, params, mesh = sampling_params(model)
    if mesh is not None and buckets.batch_sizes is None:
        multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        if r % multiple:
            r = -(-r // multiple) * multiple
            batch = _prompt_batch(model, prompts, images, r, p)

    budget = np.ones((r, g), np.int32)  # batch-padding rows are done after their first token
    budget[:rows] = max_new_tokens
    p_index = np.zeros((r,), np.int32)
    p_index[:rows] = prompt_index
    s_index = np.zeros((r, g), np.int32)
    s_index[:rows] = sample_index
    stops = np.full((bucket_size(len(stop_tokens), None, 8, "stop tokens"),), -1, np.int32)
    stops[:len(stop_tokens)] = list(stop_tokens)

    program = _Program(graphdef=graphdef, num_samples=g, num_new=n, temperature=float(temperature),
                       top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p))
    per_row = (p_index, s_index, budget)
    if mesh is not None:
        rows_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        per_row = tuple(jax.device_put(a, rows_sharding) for a in per_row)
    with _maybe_mesh(mesh), shd.use_rules(sampling_rules()):
        if compile_only:
            prefill = _prefill_jit.lower(program, params, batch, *per_row, stops, np.uint32(seed)).compile()
            prefix, state = prefill.out_info
            _decode_jit.lower(program, params, prefix, stops, state).compile()
            return None
        prefix, state = _prefill_jit(program, params, batch, *per_row, stops, np.uint32(seed))
        state = _decode_jit(program, params, prefix, stops, state)
    tokens, logprobs, lengths = jax.device_get((state.tokens, state.logprobs, state.lengths))
    out_tokens, out_logprobs, out_prompt, out_sample = [], [], [], []
    for i in range(rows):
        for j in range(g):
            k = int(lengths[i, j])
            out_tokens.append(tokens[i, j, :k].tolist())
            out_logprobs.append(logprobs[i, j, :k].tolist())
            out_prompt.append(int(prompt_index[i]))
            out_sample.append(int(sample_index[i, j]))
    return SampleOutput(out_tokens, out_logprobs, out_prompt, out_sample)


def _maybe_mesh(mesh: jax.sharding.Mesh | None):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def generate(
    model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), seed: int = 0, images: Sequence[Any] | None = None,
) -> SampleOutput:
    """Samples `num_samples` completions per prompt, prefilling each prompt (and its images) once.

    Args:
      model: a `Qwen2ForCausalLM` or `Qwen2_5_VLForConditionalGeneration` (on one device or sharded on a mesh).
      prompts: token-id lists (any lengths; left-padded to a bucket internally). For the VL model, each image
        appears as its run of `<|image_pad|>` tokens, as the processor expands them.
      max_new_tokens: new tokens per sample (fewer when a stop token is emitted).
      num_samples: samples per prompt (GRPO's G); samples of one prompt are adjacent in the output.
      temperature: 0 for greedy decoding.
      top_k, top_p: optional filters applied to logits / temperature before the draw.
      stop_tokens: token ids that end a sample (the stop token is returned).
      seed: the sample of prompt p with index g uses key fold_in(fold_in(key(seed), p), g).
      images: VL model only: per prompt, its processor output (a mapping or object with `pixel_values` and
        `image_grid_thw`, e.g. `{"pixel_values": ..., "image_grid_thw": ...}`) or None for a text-only prompt.

    Returns:
      `SampleOutput` with tokens, logprobs, prompt_index, sample_index (len(prompts) * num_samples rows).
    """
    clean = _validate(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens)
    images = _check_images(model, clean, images)
    return _sample(model, *_request_rows(clean, images, num_samples, repeated=False), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                   buckets=DEFAULT_BUCKETS)


def _request_rows(prompts: list[list[int]], images: list[Any] | None, num_samples: int, *,
                  repeated: bool) -> tuple[list[list[int]], list[Any] | None, np.ndarray, np.ndarray]:
    """The prefill rows of a request and their (prompt, sample) indices: one row per prompt with
    `num_samples` samples each, or (`repeated`, the peers' way) `num_samples` rows per prompt with one sample.

    Returns rows, their images (or None), prompt_index `[R]` and sample_index `[R, G]`.
    """
    b = len(prompts)
    if not repeated:
        sample_index = np.broadcast_to(np.arange(num_samples, dtype=np.int32), (b, num_samples))
        return prompts, images, np.arange(b, dtype=np.int32), sample_index
    rows = [x for x in prompts for _ in range(num_samples)]
    row_images = None if images is None else [x for x in images for _ in range(num_samples)]
    prompt_index = np.repeat(np.arange(b, dtype=np.int32), num_samples)
    sample_index = np.tile(np.arange(num_samples, dtype=np.int32), b)[:, None]
    return rows, row_images, prompt_index, sample_index


def precompile(
    model: nnx.Module, *, batch_size: int, prompt_length: int, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, num_stop_tokens: int = 0,
    repeated: bool = False, image_grid_thw: Any | None = None,
) -> None:
    """Compiles (ahead of time, running nothing) the programs `generate` will use for requests of these sizes.

    Any later `generate` call whose prompt count, longest prompt, `max_new_tokens` and number of stop tokens fall
    in the same buckets, with the same sampling settings, compiles nothing. `repeated` compiles for
    `generate_repeated` instead. For a vision-language model, `image_grid_thw` (`[N, 3]`, the (t, h, w) grids
    of the batch's images, as the image processor returns them) compiles the vision buckets those images fall
    in; which prompt holds which image does not change the buckets.
    """
    if image_grid_thw is None:
        prompts, images = [[1] * prompt_length] * batch_size, None
    else:
        prompts, images = _placeholder_image_prompts(model, batch_size, prompt_length, image_grid_thw)
    stops = [0] * num_stop_tokens
    clean = _validate(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stops)
    images = _check_images(model, clean, images)
    _sample(model, *_request_rows(clean, images, num_samples, repeated=repeated), max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops, seed=0, buckets=DEFAULT_BUCKETS,
            compile_only=True)


def _placeholder_image_prompts(model: nnx.Module, batch_size: int, prompt_length: int,
                               image_grid_thw: Any) -> tuple[list[list[int]], list[Any]]:
    """Prompts of `prompt_length` tokens holding the images' placeholder tokens, images dealt out in turn, with
    zero pixels: the shapes a batch of such images compiles to."""
    if not hasattr(model, "language_model"):
        raise ValueError(f"image_grid_thw was given but {type(model).__name__} is a text-only model")
    from m2io_jax.models.qwen2_5_vl import num_image_tokens

    config = model.config
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    tokens = num_image_tokens(grid, config.vision.spatial_merge_size)
    filler = 1 if config.image_token_id != 1 else 0
    prompts, images = [], []
    for i in range(batch_size):
        mine = np.arange(i, len(grid), batch_size)
        n = int(tokens[mine].sum())
        if n > prompt_length:
            raise ValueError(f"image_grid_thw: prompt {i} of {batch_size} would hold {n} image tokens (images "
                             f"{mine.tolist()}), more than prompt_length={prompt_length}")
        prompts.append([config.image_token_id] * n + [filler] * (prompt_length - n))
        pixels = np.zeros((int(grid[mine].prod(axis=1).sum()), config.vision.patch_dim), np.float32)
        images.append({"pixel_values": pixels, "image_grid_thw": grid[mine]} if len(mine) else None)
    return prompts, images


def generate_repeated(
    model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), seed: int = 0, images: Sequence[Any] | None = None,
) -> SampleOutput:
    """`generate` the way peers do it: every prompt (and its images) repeated `num_samples` times and prefilled
    once per copy.

    Same keys per (prompt, sample), hence the same samples as `generate`; used to test and to measure what
    prefix sharing saves.
    """
    clean = _validate(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens)
    images = _check_images(model, clean, images)
    return _sample(model, *_request_rows(clean, images, num_samples, repeated=True), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                   buckets=DEFAULT_BUCKETS)
