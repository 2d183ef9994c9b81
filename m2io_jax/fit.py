"""Fit before step 0: does a training stage fit in device memory? Answered before any step runs.

Where the backend reports device memory (`device.memory_stats()["bytes_limit"]`; None on CPU: then the check
is skipped and says so), `check` compiles the stage's update programs ahead of time (`.lower().compile()` on
abstract arguments of the real sizes: the largest prompts of the stage and its completion length) and adds,
per device:
  resident state   parameters, optimizer state, gradient accumulator (LoRA: of the adapters only), and for
                   GRPO the reference copy (beta != 0, none with LoRA), the sampler's weight copy (compute
                   dtype, sampling layout) and the KV cache of B * G rows (prompt plus completion slots);
  temporaries      the largest of the compiled programs' `memory_analysis().temp_size_in_bytes`.
`decide` compares the sum with the device's memory and, when it does not fit, names the knobs to turn.
The rollout's own temporaries are not measured (`sampling.precompile` returns no executable); its KV cache is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from m2io_jax import sharding as shd
from m2io_jax.buckets import bucket_size
from m2io_jax.models import lora
from m2io_jax.rl import steps
from m2io_jax.rl.optimizer import cast_floating
from m2io_jax.sampling.layout import row_multiple, sampling_rules

HEADROOM = 0.9
"""The fraction of the device's memory a stage may plan for (the rest: fragmentation, runtime buffers)."""

KNOBS = ("the batch (config.grpo.batch_size / config.sft.batch_size, or config.rollout.micro_batch_prompts for "
         "the update)", "G (config.grpo.num_generations)", "remat (the model config's remat policy)",
         "LoRA (train adapters instead of all weights)", "the mesh (config.mesh: more fsdp / tensor devices)")


@dataclasses.dataclass(frozen=True)
class FitReport:
    """fits: True / False, or None when the backend reports no memory (check skipped). message: one line."""

    fits: bool | None
    message: str


def device_memory(devices: Sequence[jax.Device] | None = None) -> int | None:
    """The smallest `bytes_limit` of the local devices, or None when any reports no memory (CPU)."""
    stats = [d.memory_stats() for d in (devices or jax.local_devices())]
    if any(s is None or "bytes_limit" not in s for s in stats):
        return None
    return min(int(s["bytes_limit"]) for s in stats)


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs): the shard shape under `shardings` (a tree
    like `tree`), else each leaf's own sharding, else the whole leaf."""
    leaves = jax.tree.leaves(tree)
    placements = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    total = 0
    for leaf, placement in zip(leaves, placements, strict=True):
        placement = placement if placement is not None else getattr(leaf, "sharding", None)
        shape = placement.shard_shape(leaf.shape) if placement is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def decide(resident: Mapping[str, int], temporaries: Mapping[str, int], capacity: int | None, *,
           headroom: float = HEADROOM) -> FitReport:
    """Whether `resident` state plus the largest program's `temporaries` fit in `headroom` of `capacity` bytes.

    capacity None: the backend reports no memory; the report says the check was skipped.
    """
    if capacity is None:
        return FitReport(None, f"fit check skipped: the {jax.default_backend()} backend reports no device memory "
                               f"(memory_stats() is None)")
    largest = max(temporaries, key=temporaries.get) if temporaries else None
    needed = sum(resident.values()) + (temporaries[largest] if largest else 0)
    parts = ", ".join(f"{name} {_size(size)}" for name, size in resident.items())
    if largest:
        parts += f", temporaries of {largest} {_size(temporaries[largest])}"
    summary = f"{_size(needed)} per device ({parts}) of {_size(capacity)} ({headroom:.0%} usable)"
    if needed <= headroom * capacity:
        return FitReport(True, f"fit check: {summary}")
    return FitReport(False, f"does not fit in device memory: {summary}; to fit, lower or change: "
                            + "; ".join(KNOBS))


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def longest(prompts: Sequence[Sequence[int]], count: int) -> list[int]:
    """Indices of the `count` longest prompts: the batch with the longest prompt bucket and, for a vision-language
    model, about the most image tokens (the largest programs a stage will run)."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)[:count]


def _abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree`, with `shardings` (a tree like it) or each leaf's own sharding when it has one."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding",
                                                                                                   None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _scalar() -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jnp.float32)


def measure(model: nnx.Module, config: ml_collections.ConfigDict, *, stage: str, prompts: Sequence[Sequence[int]],
            images: Sequence[Any] | None, completion_length: int, suppress_tokens: Sequence[int] = (),
            mesh: jax.sharding.Mesh | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """(resident bytes by name, temporaries by program) per device of a stage ("sft" or "grpo") on `prompts`.

    `config` has the trainer's sections (grpo, optimizer, rollout) as `rl.trainer.Trainer` takes them; the
    programs are compiled ahead of time on abstract arguments (under `mesh`, as the trainer runs them), nothing
    runs on the device.
    """
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _measure(model, config, stage=stage, prompts=prompts, images=images,
                        completion_length=completion_length, suppress_tokens=suppress_tokens, mesh=mesh)


def abstract_trainer(model: nnx.Module, config: ml_collections.ConfigDict, *, temperature: float,
                     suppress_tokens: Sequence[int], mesh: jax.sharding.Mesh | None,
                     shardings: Any = None) -> tuple[steps.StepSpec, nnx.State]:
    """The step spec and abstract master parameters that `rl.trainer.Trainer` builds for `model` under `config`
    (sections grpo, optimizer, rollout): the trained part in param_dtype, a LoRA base in the compute dtype;
    `shardings`: a tree like the model's state (None: each leaf's own)."""
    adapters = lora.has_adapters(model)
    graphdef, state = nnx.split(model)
    master = functools.partial(steps.master_params, adapters=adapters, optimizer=config.optimizer)
    params = _abstract(jax.eval_shape(master, state), shardings)
    spec = steps.StepSpec.create(graphdef, params, temperature=temperature, suppress_tokens=suppress_tokens,
                                 grpo_config=steps.trainer_grpo_config(config), optimizer_config=config.optimizer,
                                 mesh=mesh, vision_parameters=model.vision_parameters, adapters=adapters)
    return spec, params


def _measure(model: nnx.Module, config: ml_collections.ConfigDict, *, stage: str, prompts: Sequence[Sequence[int]],
             images: Sequence[Any] | None, completion_length: int, suppress_tokens: Sequence[int],
             mesh: jax.sharding.Mesh | None) -> tuple[dict[str, int], dict[str, int]]:
    rollout, optimizer = config.rollout, config.optimizer
    state = nnx.state(model)
    train_shardings = None if mesh is None else shd.state_shardings(state, mesh)
    spec, params = abstract_trainer(model, config, temperature=rollout.temperature if stage == "grpo" else 1.0,
                                    suppress_tokens=suppress_tokens, mesh=mesh, shardings=train_shardings)
    grpo_config, adapters = spec.grpo_config(), spec.adapters
    trainable = steps.split_trainable(adapters, params)[0]
    init = steps.init_optimizer_program(spec, params).lower(spec, params)
    opt_state = _abstract(init.out_info, init.compile().output_shardings)

    rows = bucket_size(len(prompts), tuple(rollout.batch_sizes), 1, "prompts per batch")
    if not rollout.batch_sizes:
        rows = -(-rows // row_multiple(mesh)) * row_multiple(mesh)
    length = bucket_size(max(len(p) for p in prompts), tuple(rollout.prompt_lengths), rollout.min_prompt_length,
                         "prompt length")
    inputs = _abstract(model.prepare_prompts(prompts, images, rows=rows, length=length))
    features = None
    if inputs.vision is not None:
        features = jax.eval_shape(functools.partial(steps.rl_encode_vision, spec), params, inputs)
    n = completion_length
    resident = {"parameters": per_device_bytes(params), "optimizer": per_device_bytes(opt_state)}
    temporaries: dict[str, int] = {}

    def compiled_temp(program: Any, *args: Any) -> int:
        analysis = program.lower(spec, *args).compile().memory_analysis()
        return 0 if analysis is None else int(analysis.temp_size_in_bytes)

    if stage == "sft":
        batch = steps.SftBatch(inputs, features, jax.ShapeDtypeStruct((rows, 1, n), jnp.int32),
                               jax.ShapeDtypeStruct((rows, 1, n), jnp.float32))
        temporaries["sft_update"] = compiled_temp(steps.sft_update, params, opt_state, batch)
        return resident, temporaries

    g = grpo_config.num_generations
    compute = _abstract(jax.eval_shape(functools.partial(cast_floating, dtype=optimizer.compute_dtype), params),
                        train_shardings)
    accumulated = steps.Accumulated(trainable, *[_scalar() for _ in range(5)])
    resident["gradient accumulator"] = per_device_bytes(trainable)
    if grpo_config.beta != 0.0 and not adapters:  # with LoRA the reference is the base, adapters off: no copy
        resident["reference"] = per_device_bytes(compute)
    if mesh is not None:  # the sampler re-lays the compute-dtype weights out for decoding
        resident["sampler weights"] = per_device_bytes(compute, shd.state_shardings(state, mesh, sampling_rules()))
    elif jnp.dtype(optimizer.compute_dtype) != jnp.dtype(optimizer.param_dtype):  # the cast of the trained part
        resident["sampler weights"] = per_device_bytes(steps.split_trainable(adapters, compute)[0])
    slot = per_device_bytes(jax.eval_shape(lambda: model.init_suffix_cache(1, 1, 1)))  # one token of one row
    resident["KV cache"] = slot * rows * (length + g * rollout.max_new_tokens) // (1 if mesh is None else mesh.size)

    micro = rollout.micro_batch_prompts if 0 < rollout.micro_batch_prompts < rows else rows
    row_fields = {name: getattr(inputs, name) for name in ("ids", "mask", "positions", "next_position", "image_index")}
    micro_inputs = inputs.replace(**{  # positions: [B, P] or [3, B, P]; the others lead with B
        name: jax.ShapeDtypeStruct((*value.shape[:-2], micro, value.shape[-1]) if name == "positions"
                                   else (micro, *value.shape[1:]), value.dtype)
        for name, value in row_fields.items() if value is not None})
    logp = jax.ShapeDtypeStruct((micro, g, n), jnp.float32)
    batch = steps.GrpoBatch(micro_inputs, features, jax.ShapeDtypeStruct((micro, g, n), jnp.int32), logp,
                            jax.ShapeDtypeStruct((micro, g), jnp.float32), jax.ShapeDtypeStruct((micro, g), jnp.bool_),
                            jax.ShapeDtypeStruct((micro,), jnp.float32),
                            old_logp=logp if grpo_config.num_iterations > 1 else None,
                            ref_logp=logp if grpo_config.beta != 0.0 else None)
    temporaries["grpo_gradients"] = compiled_temp(steps.grpo_gradients, params, batch, accumulated)
    temporaries["apply_gradients"] = compiled_temp(steps.apply_gradients, params, opt_state, accumulated)
    temporaries["logprobs"] = compiled_temp(steps.logprobs, params, inputs, features,
                                            jax.ShapeDtypeStruct((rows, g, n), jnp.int32))
    return resident, temporaries


def check(model: nnx.Module, config: ml_collections.ConfigDict, *, stage: str, prompts: Sequence[Sequence[int]],
          images: Sequence[Any] | None, completion_length: int, suppress_tokens: Sequence[int] = (),
          mesh: jax.sharding.Mesh | None = None, capacity: int | None = None) -> FitReport:
    """`decide` on `measure`'s numbers for the device memory (`capacity`, default `device_memory()`); skipped,
    compiling nothing, when the backend reports no memory."""
    capacity = device_memory() if capacity is None else capacity
    if capacity is None:
        report = decide({}, {}, None)
    else:
        report = decide(*measure(model, config, stage=stage, prompts=prompts, images=images,
                                 completion_length=completion_length, suppress_tokens=suppress_tokens, mesh=mesh),
                        capacity)
    return dataclasses.replace(report, message=f"{stage}: {report.message}")
