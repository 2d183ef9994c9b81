"""The sampler's public entry points: `generate`, `generate_prepared`, `generate_repeated`, `precompile`.

`generate(model, prompts, num_samples=G, ...)` prefills each prompt once and decodes its G samples against that
one prompt cache: the prompt's keys and values live in a shared `PrefixCache` `[L, B, P, KV, hd]` and every
sample only owns a `SuffixCache` `[L, B, G, N, KV, hd]` for the tokens it generates (`programs`). Peers
(transformers `generate`, tunix) prefill the prompt G times and keep G copies of its cache.

Randomness: row (prompt p, sample g) uses `fold_in(fold_in(key(seed), p), g)` folded with the step, so tokens
do not depend on batch composition and `generate(num_samples=G)` equals `generate_repeated` (the prompt
prefilled G times) token for token.

Log-probabilities are those the trainer recomputes (`CausalLM.completion_logprobs`): `log_softmax(logits /
temperature)` of the chosen token, before top-k / top-p filtering (temperature 1 when greedy).

Shapes are bucketed (prompt length, batch and generation length to powers of two, or to `Buckets` lists), so
repeated calls reuse compiled programs; `compile_count()` counts the programs compiled so far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from m2io_jax import sharding as shd
from m2io_jax.buckets import bucket_size
from m2io_jax.models.protocol import CausalLM, PreparedInputs
from m2io_jax.sampling.layout import mesh_of, row_multiple, rows_on_mesh, sampling_params, sampling_rules
from m2io_jax.sampling.programs import SamplerProgram, decode_jit, prefill_jit
from m2io_jax.sampling.requests import DEFAULT_BUCKETS, Buckets, SampleOutput, request_rows, validate_request


def _sample(model: CausalLM, prompts: list[list[int]], images: list[Any] | None, prompt_index: np.ndarray,
            sample_index: np.ndarray, *, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, stop_tokens: Sequence[int], seed: int, buckets: Buckets,
            suppress_tokens: Sequence[int] = (), compile_only: bool = False) -> SampleOutput | None:
    """Prefills rows `prompts` once each and decodes sample_index.shape[1] samples per row.

    With compile_only, compiles the prefill and decode programs of this request's buckets and runs nothing.
    """
    rows, g = sample_index.shape
    p = bucket_size(max(len(x) for x in prompts), buckets.prompt_lengths, buckets.min_prompt_length, "prompt length")
    n = bucket_size(max_new_tokens, buckets.new_token_lengths, buckets.min_new_tokens, "max_new_tokens")
    r = bucket_size(rows, buckets.batch_sizes, buckets.min_batch_size, "batch size")
    mesh = mesh_of(nnx.state(model))
    if buckets.batch_sizes is None:
        r = -(-r // row_multiple(mesh)) * row_multiple(mesh)
    batch = model.prepare_prompts(prompts, images, rows=r, length=p)  # validates images before any compile
    return _sample_prepared(model, batch, None, prompt_index, sample_index, max_new_tokens=max_new_tokens,
                            num_new=n, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
                            suppress_tokens=suppress_tokens, seed=seed, compile_only=compile_only)


def _sample_prepared(model: CausalLM, batch: PreparedInputs, vision_features: jax.Array | None,
                     prompt_index: np.ndarray, sample_index: np.ndarray, *, max_new_tokens: int, num_new: int,
                     temperature: float, top_k: int | None, top_p: float | None, stop_tokens: Sequence[int],
                     suppress_tokens: Sequence[int], seed: int, compile_only: bool = False) -> SampleOutput | None:
    """Prefills the prepared rows `batch` once each (with `vision_features`, or the tower runs in the prefill)
    and decodes sample_index.shape[1] samples for each of its first sample_index.shape[0] rows, in `num_new`
    static slots. With compile_only, compiles the two programs and runs nothing.
    """
    rows, g = sample_index.shape
    r, n = batch.ids.shape[0], num_new
    graphdef, params, mesh = sampling_params(model)

    budget = np.ones((r, g), np.int32)  # batch-padding rows are done after their first token
    budget[:rows] = max_new_tokens
    p_index = np.zeros((r,), np.int32)
    p_index[:rows] = prompt_index
    s_index = np.zeros((r, g), np.int32)
    s_index[:rows] = sample_index
    stops = np.full((bucket_size(len(stop_tokens), None, 8, "stop tokens"),), -1, np.int32)
    stops[:len(stop_tokens)] = list(stop_tokens)

    program = SamplerProgram(graphdef=graphdef, num_samples=g, num_new=n, temperature=float(temperature),
                             top_k=None if top_k is None else int(top_k),
                             top_p=None if top_p is None else float(top_p),
                             suppress_tokens=tuple(int(t) for t in suppress_tokens))
    per_row = rows_on_mesh((p_index, s_index, budget), mesh)
    with _maybe_mesh(mesh), shd.use_rules(sampling_rules()):
        if compile_only:
            prefill = prefill_jit.lower(program, params, batch, *per_row, stops, np.uint32(seed),
                                        vision_features).compile()
            prefix, state = prefill.out_info
            decode_jit.lower(program, params, prefix, stops, state).compile()
            return None
        prefix, state = prefill_jit(program, params, batch, *per_row, stops, np.uint32(seed), vision_features)
        state = decode_jit(program, params, prefix, stops, state)
    tokens, logprobs, lengths = shd.to_host((state.tokens, state.logprobs, state.lengths))
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
    model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), seed: int = 0, images: Sequence[Any] | None = None,
    buckets: Buckets | None = None, suppress_tokens: Sequence[int] = (),
) -> SampleOutput:
    """Samples `num_samples` completions per prompt, prefilling each prompt (and its images) once.

    Args:
      model: a `CausalLM` (`Qwen2ForCausalLM` or `Qwen2_5_VLForConditionalGeneration`), on one device or
        sharded on a mesh.
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
      buckets: the static sizes to pad to (default: powers of two, `DEFAULT_BUCKETS`).
      suppress_tokens: token ids never sampled (e.g. `<|image_pad|>`), masked before the log-softmax.

    Returns:
      `SampleOutput` with tokens, logprobs, prompt_index, sample_index (len(prompts) * num_samples rows).
    """
    clean = validate_request(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p,
                             [*stop_tokens, *suppress_tokens])
    return _sample(model, *request_rows(clean, images, num_samples, repeated=False), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                   buckets=buckets or DEFAULT_BUCKETS, suppress_tokens=suppress_tokens)


def generate_prepared(
    model: CausalLM, inputs: PreparedInputs, *, num_prompts: int, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), suppress_tokens: Sequence[int] = (), seed: int = 0,
    vision_features: jax.Array | None = None, buckets: Buckets | None = None,
) -> SampleOutput:
    """`generate` from prompts the caller prepared (`CausalLM.prepare_prompts`, in row and length buckets of
    its choosing) and, for a VL model, their features (`CausalLM.encode_vision`), so that a training step which
    reuses both runs the vision tower once. The first `num_prompts` rows of `inputs` are the prompts (the rest
    pad the batch); the other arguments are `generate`'s (`buckets` only sets the new-token bucket).
    """
    ids, mask = np.asarray(inputs.ids), np.asarray(inputs.mask)
    if not 0 < num_prompts <= ids.shape[0]:
        raise ValueError(f"num_prompts={num_prompts} must be in [1, {ids.shape[0]}] (the prepared rows)")
    prompts = [ids[i][mask[i] > 0].tolist() for i in range(num_prompts)]
    validate_request(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p,
                     [*stop_tokens, *suppress_tokens])
    buckets = buckets or DEFAULT_BUCKETS
    _, _, prompt_index, sample_index = request_rows(prompts, None, num_samples, repeated=False)
    n = bucket_size(max_new_tokens, buckets.new_token_lengths, buckets.min_new_tokens, "max_new_tokens")
    return _sample_prepared(model, inputs, vision_features, prompt_index, sample_index,
                            max_new_tokens=max_new_tokens, num_new=n, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_tokens=stop_tokens, suppress_tokens=suppress_tokens, seed=seed)


def generate_repeated(
    model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), seed: int = 0, images: Sequence[Any] | None = None,
    buckets: Buckets | None = None,
) -> SampleOutput:
    """`generate` the way peers do it: every prompt (and its images) repeated `num_samples` times and prefilled
    once per copy.

    Same keys per (prompt, sample), hence the same samples as `generate`; used to test and to measure what
    prefix sharing saves.
    """
    clean = validate_request(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens)
    return _sample(model, *request_rows(clean, images, num_samples, repeated=True), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                   buckets=buckets or DEFAULT_BUCKETS)


def precompile(
    model: CausalLM, *, batch_size: int, prompt_length: int, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, num_stop_tokens: int = 0,
    repeated: bool = False, image_grid_thw: Any | None = None, buckets: Buckets | None = None,
) -> None:
    """Compiles (ahead of time, running nothing) the programs `generate` will use for requests of these sizes.

    Any later `generate` call whose prompt count, longest prompt, `max_new_tokens` and number of stop tokens fall
    in the same buckets, with the same sampling settings, compiles nothing. `repeated` compiles for
    `generate_repeated` instead. For a vision-language model, `image_grid_thw` (`[N, 3]`, the (t, h, w) grids
    of the batch's images, as the image processor returns them) compiles the vision buckets those images fall
    in; which prompt holds which image does not change the buckets.
    """
    prompts, images = model.placeholder_prompts(batch_size, prompt_length, image_grid_thw)
    stops = [0] * num_stop_tokens
    clean = validate_request(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stops)
    _sample(model, *request_rows(clean, images, num_samples, repeated=repeated), max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops, seed=0,
            buckets=buckets or DEFAULT_BUCKETS, compile_only=True)
