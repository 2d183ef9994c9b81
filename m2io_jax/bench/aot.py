"""TPU compile report: compile a config's programs for a real TPU topology on this CPU machine, and read them.

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v5e_8.py [--dump_hlo DIR]
        [--config.model.overrides.text.attention_impl=pallas] [--config.tpu.prompt_length=4096] ...

Needs libtpu (the `tpu` extra). The model is built abstractly (`nnx.eval_shape` of the config's shapes in
`tpu.model`, a Hugging Face config dictionary, plus `model.overrides`: nothing is allocated, no checkpoint is
read), its abstract parameters get the mesh's shardings on the devices of
`jax.experimental.topologies.get_topology_desc(tpu.topology)` in the layout a TPU VM gives (`chips.Chip`:
one device per chip, megacore on v4 / v5p), and each program is lowered and compiled for that topology:

  grpo configs   encode_vision (the tower once per step), rollout_prefill and rollout_decode (the sampler's
                 programs, in its weight layout), decode_step (one step of the decode loop, for its cost),
                 reference_logprobs, grpo_gradients (one micro-batch of the update) and apply_gradients,
                 with the trainer's arguments (`rl.steps`) at the config's largest sizes;
  sample configs prefill, decode and decode_step of the sampler for serving a text model.

Printed, per device: resident state (parameters, optimizer, gradient accumulator, reference, the sampler's
weight copy, KV cache; from the arguments' and outputs' shard shapes) and each program's temporaries
(`memory_analysis`) against the chip's HBM (`fit.decide`); per program the compile time, FLOPs three ways
(XLA `cost_analysis`, which counts a loop body once; the trip-count-aware matmul count of the optimised HLO,
`hlo_costs`; the analytic count of `m2io_jax.flops`), XLA's `optimal_seconds` as reported (it covers one pass
of each loop body, and libtpu 0.0.42 returns negative values for the 3B programs), the estimated time (the
roofline of the optimised HLO: every op at max(FLOPs / peak, HBM bytes / bandwidth), loops times their trip
counts, communication left out) and the MFU that time gives the analytic FLOPs; the GRPO update (all
micro-batches plus apply_gradients) as one figure; the decode step's estimated time (one iteration of the
decode loop's costliest stage, read from rollout_decode's HLO) against its HBM roofline (the bytes a step must
read: its share of the sampler's weights and of the KV cache, over the chip's bandwidth); the collectives of
each optimised HLO. Exits 1 when resident state plus the largest temporaries
exceed 0.9 x HBM. The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m2io_jax import chips, cli, fit, flops, train_config
from m2io_jax import sharding as shd
from m2io_jax.bench import hlo_costs
from m2io_jax.models import lora
from m2io_jax.models.overrides import override_fields
from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from m2io_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig
from m2io_jax.rl import steps
from m2io_jax.rl.optimizer import cast_floating
from m2io_jax.sampling.layout import sampling_rules
from m2io_jax.sampling.programs import SamplerProgram, decode_jit, prefill_jit

_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "write each program's optimised HLO to DIR/<program>.hlo.txt")
_CONFIG = cli.define_config(train_config, "a TPU config (configs/tpu/*.py): the training sections plus `tpu`")

PROGRAM_KINDS = ("grpo", "sample")


@dataclasses.dataclass
class Compiled:
    """One compiled program and what the report reads from it."""

    name: str
    seconds: float
    temp_bytes: int
    xla_flops: float
    optimal_seconds: float
    hlo: hlo_costs.HloCosts
    analytic_flops: float  # per device
    executable: Any = dataclasses.field(repr=False)  # None: the compiler refused it (temporaries over HBM)

    @property
    def estimated_seconds(self) -> float:
        """The roofline time of the optimised HLO (`hlo_costs`: every op at max(FLOPs / peak, bytes / bandwidth),
        loops times their trip counts)."""
        return self.hlo.seconds


def _say(text: str) -> None:
    print(text, flush=True)


def topology_devices(tpu: ml_collections.ConfigDict) -> tuple[list[Any], chips.Chip]:
    """The devices of `tpu.topology` in the layout a TPU VM gives (one device per chip), and the chip."""
    from jax.experimental import topologies

    chip = chips.chip_of_topology(tpu.topology)
    kwargs = dict(chip.topology_kwargs)
    if tpu.chips_per_host_bounds:
        kwargs["chips_per_host_bounds"] = tuple(tpu.chips_per_host_bounds)
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology, **kwargs).devices
    except Exception as error:  # libtpu missing or the topology unknown: both are the user's to fix
        raise cli.UserError(f"tpu.topology={tpu.topology!r}: get_topology_desc failed ({error}); install the `tpu` "
                            f"extra (libtpu) and check the topology name") from error
    return list(devices), chip


def model_config(config: ml_collections.ConfigDict) -> Qwen2Config | Qwen2_5_VLConfig:
    """The model config of `tpu.model` (a Hugging Face config dictionary) with `model.overrides` applied."""
    hf = config.tpu.model.to_dict()
    overrides = _dotted(config.model.overrides.to_dict()) if "overrides" in config.model else {}
    where = "--config.model.overrides"
    if hf.get("model_type") == "qwen2_5_vl":
        return override_fields(Qwen2_5_VLConfig.from_hf(hf, source="tpu.model"), overrides, where)
    if hf.get("model_type") == "qwen2":
        return override_fields(Qwen2Config.from_hf(hf, source="tpu.model"), overrides, where)
    raise cli.UserError(f"tpu.model.model_type={hf.get('model_type')!r}: expected 'qwen2' or 'qwen2_5_vl'")


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def abstract_model(config: Qwen2Config | Qwen2_5_VLConfig, lora_config: ml_collections.ConfigDict) -> nnx.Module:
    """The model of `config` (with `lora_config`'s adapters), as ShapeDtypeStructs: nothing is allocated."""
    cls = Qwen2_5_VLForConditionalGeneration if isinstance(config, Qwen2_5_VLConfig) else Qwen2ForCausalLM
    return nnx.eval_shape(lambda: lora.apply_config(cls(config, rngs=nnx.Rngs(0)), lora_config))


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of host arrays, replicated on `mesh` (what the trainer's numpy inputs become)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _rows(shape: tuple[int, ...], dtype: Any, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
    """A per-row array sharded over data/fsdp, as `sampling.layout.rows_on_mesh` places it."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))


def _bytes_of(tree: Any) -> int:
    return fit.per_device_bytes(tree)


def _output_bytes(compiled: Any) -> int:
    return fit.per_device_bytes(compiled.out_info, compiled.output_shardings)


def compile_program(name: str, jitted: Any, args: Sequence[Any], analytic_flops: float, dump_dir: str | None,
                    chip: chips.Chip, static: Sequence[Any] = ()) -> Compiled:
    """Lowers and compiles `jitted(*static, *args)` and reads its memory, costs and HLO (timed on `chip`)."""
    start = time.perf_counter()
    try:
        executable = jitted.lower(*static, *args).compile()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses temporaries beyond the device's HBM
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(error))
        if "RESOURCE_EXHAUSTED" not in str(error) or needed is None:
            raise
        seconds = time.perf_counter() - start
        _say(f"  {name}: the compiler refuses it: {needed.group(1)} GB of temporaries exceed the device's HBM")
        return Compiled(name=name, seconds=seconds, temp_bytes=int(float(needed.group(1)) * 1e9), xla_flops=0.0,
                        optimal_seconds=0.0, hlo=hlo_costs.HloCosts(0.0, 0.0, {}, {}, 0, ()),
                        analytic_flops=analytic_flops, executable=None)
    seconds = time.perf_counter() - start
    memory = executable.memory_analysis()
    costs = executable.cost_analysis()
    costs = (costs[0] if isinstance(costs, list) else costs) or {}
    text = executable.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{name}.hlo.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    result = Compiled(name=name, seconds=seconds,
                      temp_bytes=0 if memory is None else int(memory.temp_size_in_bytes),
                      xla_flops=float(costs.get("flops", 0.0)),
                      optimal_seconds=float(costs.get("optimal_seconds", 0.0)),
                      hlo=hlo_costs.analyse(text, chip.peak_flops_per_device(), chip.hbm_bandwidth_per_device()),
                      analytic_flops=analytic_flops, executable=executable)
    _say(f"  compiled {name} in {seconds:.1f} s")
    return result


def _needed(program: Compiled) -> None:
    """Later programs take `program`'s outputs: stop with the fit verdict when it could not be compiled."""
    if program.executable is None:
        raise cli.UserError(f"does not fit in device memory: {program.name} needs "
                            f"{program.temp_bytes / 1e9:.1f} GB of temporaries (the compiler's figure)")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The sizes compiled: R prompt rows of P tokens (global), G samples of N tokens, M rows per micro-batch."""

    rows: int
    prompt_length: int
    num_samples: int
    new_tokens: int
    micro_rows: int
    grids: tuple[tuple[int, int, int], ...]  # every image of the batch, (t, h, w) patches

    def grids_of(self, rows: int) -> tuple[tuple[int, int, int], ...]:
        """The images of the first `rows` prompts (images are dealt out to prompts in turn)."""
        return tuple(g for i, g in enumerate(self.grids) if i % self.rows < rows)


def workload(config: ml_collections.ConfigDict, model_cfg: Any, processes: int, mesh: jax.sharding.Mesh) -> Workload:
    """The config's largest step: grpo: grpo.batch_size prompts per process, G, rollout.max_new_tokens; sample:
    tpu.batch_size prompts, tpu.num_samples, tpu.max_new_tokens; prompts of tpu.prompt_length tokens, each with
    tpu.images_per_prompt images of tpu.image_grid patches (a VL model)."""
    tpu = config.tpu
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    if tpu.program == "grpo":
        rows = config.grpo.batch_size * processes
        g, n = config.grpo.num_generations, config.rollout.max_new_tokens
        micro = config.rollout.micro_batch_prompts or rows
    else:
        rows, g, n, micro = tpu.batch_size, tpu.num_samples, tpu.max_new_tokens, tpu.batch_size
    if rows % multiple or micro % multiple or rows % micro:
        raise cli.UserError(f"{rows} prompt rows in micro-batches of {micro}: both must be multiples of the mesh's "
                            f"data x fsdp = {multiple}, and the micro-batch must divide the rows")
    images = tpu.images_per_prompt if isinstance(model_cfg, Qwen2_5_VLConfig) else 0
    grids = tuple(tuple(tpu.image_grid) for _ in range(rows * images))
    return Workload(rows, tpu.prompt_length, g, n, micro, grids)


def prepared_inputs(model: nnx.Module, work: Workload, rows: int, mesh: jax.sharding.Mesh) -> Any:
    """Abstract `PreparedInputs` of `rows` placeholder prompts (and their images), replicated on the mesh."""
    grids = work.grids_of(rows)
    prompts, images = model.placeholder_prompts(rows, work.prompt_length, np.asarray(grids) if grids else None)
    return _replicated(model.prepare_prompts(prompts, images, rows=rows, length=work.prompt_length), mesh)


def report(config: ml_collections.ConfigDict, dump_dir: str | None = None) -> dict[str, Any]:
    """Compiles the config's programs for its topology and returns the report's figures (printing as it goes)."""
    tpu = config.tpu
    if tpu.program not in PROGRAM_KINDS:
        raise cli.UserError(f"tpu.program={tpu.program!r}; expected one of {PROGRAM_KINDS}")
    devices, chip = topology_devices(tpu)
    processes = len({d.process_index for d in devices})
    mesh = shd.make_mesh(config.mesh.to_dict() or None, devices)
    capacity = chip.hbm_per_device()
    _say(f"{tpu.topology}: {len(devices)} devices of kind {devices[0].device_kind!r} ({chip.name}, one device per "
         f"chip{', megacore' if chip.megacore else ''}), {processes} host(s); mesh "
         f"{dict(mesh.shape)}; HBM {capacity / chips.GIB:.1f} GiB per device")
    model_cfg = model_config(config)
    lora_config = config.lora if tpu.program == "grpo" else ml_collections.ConfigDict({"rank": 0})
    model = abstract_model(model_cfg, lora_config)
    work = workload(config, model_cfg, processes, mesh)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # executables for a topology cannot be loaded back
    try:
        with jax.set_mesh(mesh):
            if tpu.program == "grpo":
                resident, programs = _grpo_programs(config, model, model_cfg, work, mesh, dump_dir, chip)
            else:
                resident, programs = _sample_programs(model, model_cfg, work, mesh, dump_dir, chip)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    return _summarise(config, chip, mesh, model_cfg, work, resident, programs, capacity)


def _sampler_programs(model: nnx.Module, model_cfg: Any, work: Workload, mesh: jax.sharding.Mesh,
                      params: nnx.State, inputs: Any, features: Any, dump_dir: str | None, chip: chips.Chip,
                      ) -> tuple[dict[str, int], list[Compiled]]:
    """The sampler's prefill and decode loop (and one decode step) on `params` in its weight layout."""
    graphdef = nnx.graphdef(model)
    r, g, n, p = work.rows, work.num_samples, work.new_tokens, work.prompt_length
    devices = mesh.size
    program = SamplerProgram(graphdef=graphdef, num_samples=g, num_new=n, temperature=1.0, top_k=None, top_p=None)
    per_row = (_rows((r,), jnp.int32, mesh), _rows((r, g), jnp.int32, mesh), _rows((r, g), jnp.int32, mesh))
    stops = _replicated(np.zeros((8,), np.int32), mesh)
    seed = _replicated(np.uint32(0), mesh)
    with shd.use_rules(sampling_rules()):
        prefill = compile_program("rollout_prefill", prefill_jit, (params, inputs, *per_row, stops, seed, features),
                                  flops.prefill(model_cfg, r, p).total / devices, dump_dir, chip, static=(program,))
        _needed(prefill)
        prefix, state = prefill.executable.out_info
        prefix_s, state_s = prefill.executable.output_shardings
        prefix, state = _with_sharding(prefix, prefix_s), _with_sharding(state, state_s)
        rollout = flops.rollout(model_cfg, r, g, p, n)
        decode = compile_program("rollout_decode", decode_jit, (params, prefix, stops, state),
                                 (rollout.total - flops.prefill(model_cfg, r, p).total) / devices, dump_dir,
                                 chip, static=(program,))

        def one_step(params, tokens, prefix, suffix):
            return nnx.merge(graphdef, params).decode_step(tokens, prefix, suffix, jnp.int32(n - 1), span=n)

        tokens = _rows((r, g), jnp.int32, mesh)
        step = compile_program("decode_step", jax.jit(one_step), (params, tokens, prefix, state.suffix),
                               flops.decode_step(model_cfg, r, g, p, n).total / devices, dump_dir, chip)
    kv = _bytes_of(prefix.k) + _bytes_of(prefix.v) + _bytes_of(state.suffix.k) + _bytes_of(state.suffix.v)
    return {"KV cache": kv}, [prefill, decode, step]


def _grpo_programs(config: ml_collections.ConfigDict, model: nnx.Module, model_cfg: Any, work: Workload,
                   mesh: jax.sharding.Mesh, dump_dir: str | None, chip: chips.Chip,
                   ) -> tuple[dict[str, int], list[Compiled]]:
    """The GRPO step's programs with the trainer's arguments (`rl.trainer.Trainer`, `rl.steps`)."""
    state = nnx.state(model)
    train_shardings = shd.state_shardings(state, mesh)
    spec, params = fit.abstract_trainer(model, config, temperature=config.rollout.temperature, suppress_tokens=(),
                                        mesh=mesh, shardings=train_shardings)
    grpo_config, adapters, optimizer = spec.grpo_config(), spec.adapters, config.optimizer
    opt_state = _with_sharding(jax.eval_shape(functools.partial(steps.rl_init_optimizer, spec), params),
                               steps.optimizer_state_shardings(spec, params))
    trainable = steps.split_trainable(adapters, params)[0]
    compute = _with_sharding(jax.eval_shape(functools.partial(cast_floating, dtype=optimizer.compute_dtype), params),
                             train_shardings)
    sampler_params = _with_sharding(jax.eval_shape(lambda t: t, compute),
                                    shd.state_shardings(state, mesh, sampling_rules()))
    resident = {"parameters": _bytes_of(params), "optimizer": _bytes_of(opt_state),
                "gradient accumulator": _bytes_of(trainable), "sampler weights": _bytes_of(sampler_params)}
    if grpo_config.beta != 0.0 and not adapters:
        resident["reference"] = _bytes_of(compute)

    r, g, n, p, m = work.rows, work.num_samples, work.new_tokens, work.prompt_length, work.micro_rows
    devices = mesh.size
    inputs = prepared_inputs(model, work, r, mesh)
    programs: list[Compiled] = []
    features = None
    if inputs.vision is not None:
        vision = compile_program("encode_vision", steps.encode_vision, (params, inputs),
                                 flops.vision_forward(model_cfg.vision, work.grids).total / devices, dump_dir,
                                 chip, static=(spec,))
        programs.append(vision)
        _needed(vision)
        features = _with_sharding(vision.executable.out_info, vision.executable.output_shardings)
    kv, sampler = _sampler_programs(model, model_cfg, work, mesh, sampler_params, inputs, features, dump_dir,
                                   chip)
    resident.update(kv)
    programs += sampler

    completions = _replicated(np.zeros((r, g, n), np.int32), mesh)
    forward = flops.completion_logprobs(model_cfg, r, g, p, n).total / devices
    if grpo_config.beta != 0.0:
        reference, program = (params, steps.reference_logprobs) if adapters else (compute, steps.logprobs)
        programs.append(compile_program("reference_logprobs", program, (reference, inputs, features, completions),
                                        forward, dump_dir, chip, static=(spec,)))

    micro_inputs = prepared_inputs(model, work, m, mesh)
    logp = _replicated(np.zeros((m, g, n), np.float32), mesh)
    batch = steps.GrpoBatch(
        micro_inputs, features, _replicated(np.zeros((m, g, n), np.int32), mesh), logp,
        _replicated(np.zeros((m, g), np.float32), mesh), _replicated(np.zeros((m, g), bool), mesh),
        _replicated(np.zeros((m,), np.float32), mesh), old_logp=logp if grpo_config.num_iterations > 1 else None,
        ref_logp=logp if grpo_config.beta != 0.0 else None)
    accumulated = steps.Accumulated(trainable, *[_replicated(np.float32(0), mesh) for _ in range(5)])
    update = flops.grpo_update(model_cfg, m, g, p, n, lora=adapters, train_vision=spec.train_vision,
                               grids=work.grids_of(m))
    programs.append(compile_program("grpo_gradients", steps.grpo_gradients, (params, batch, accumulated),
                                    update.total / devices, dump_dir, chip, static=(spec,)))
    programs.append(compile_program("apply_gradients", steps.apply_gradients, (params, opt_state, accumulated),
                                    0.0, dump_dir, chip, static=(spec,)))
    return resident, programs


def _sample_programs(model: nnx.Module, model_cfg: Any, work: Workload, mesh: jax.sharding.Mesh,
                     dump_dir: str | None, chip: chips.Chip) -> tuple[dict[str, int], list[Compiled]]:
    """Serving: the model's weights in the sampler's layout, prefill, decode loop and one decode step."""
    _, state = nnx.split(model)
    params = _with_sharding(state, shd.state_shardings(state, mesh, sampling_rules()))
    inputs = prepared_inputs(model, work, work.rows, mesh)
    kv, programs = _sampler_programs(model, model_cfg, work, mesh, params, inputs, None, dump_dir, chip)
    return {"parameters": _bytes_of(params), **kv}, programs


def decode_roofline_seconds(resident: dict[str, int], chip: chips.Chip) -> float:
    """The least time one decode step can take on a device: it reads its sampler weights and KV cache once."""
    weights = resident.get("sampler weights", resident.get("parameters", 0))
    return (weights + resident.get("KV cache", 0)) / chip.hbm_bandwidth_per_device()


def _summarise(config: ml_collections.ConfigDict, chip: chips.Chip, mesh: jax.sharding.Mesh, model_cfg: Any,
               work: Workload, resident: dict[str, int], programs: list[Compiled], capacity: int) -> dict[str, Any]:
    """Prints the report's tables and returns its JSON object."""
    gib = chips.GIB
    peak = chip.peak_flops_per_device()
    temporaries = {c.name: c.temp_bytes for c in programs}
    verdict = fit.decide(resident, temporaries, capacity)
    _say("\nresident state per device:")
    for name, size in resident.items():
        _say(f"  {name:<22} {size / gib:8.2f} GiB")
    _say(f"  {'total':<22} {sum(resident.values()) / gib:8.2f} GiB")
    _say("\nper program (per device):")
    _say(f"  {'program':<20} {'compile s':>9} {'temp GiB':>9} {'XLA TFLOP':>10} {'HLO TFLOP':>10} "
         f"{'analytic':>10} {'XLA opt s':>10} {'HLO est s':>10} {'MFU':>6}  collectives (executed)")
    figures = {}
    for c in programs:
        timed = c.estimated_seconds > 0 and c.analytic_flops > 0 and not c.hlo.unknown_loops
        mfu = c.analytic_flops / (c.estimated_seconds * peak) if timed else None  # a loop counted once: no MFU
        collectives = ", ".join(f"{k} {v:g}" for k, v in sorted(c.hlo.collectives_executed.items())) or "none"
        _say(f"  {c.name:<20} {c.seconds:9.1f} {c.temp_bytes / gib:9.2f} {c.xla_flops / 1e12:10.3f} "
             f"{c.hlo.flops / 1e12:10.3f} {c.analytic_flops / 1e12:10.3f} {c.optimal_seconds:10.4f} "
             f"{c.estimated_seconds:10.4f} {'n/a' if mfu is None else f'{mfu:.1%}':>6}  {collectives}"
             + (f"  [{c.hlo.unknown_loops} loop(s) of unknown trip count counted once]" if c.hlo.unknown_loops
                else ""))
        figures[c.name] = {
            "compile_seconds": round(c.seconds, 2), "temp_bytes": c.temp_bytes, "xla_flops": c.xla_flops,
            "hlo_flops": c.hlo.flops, "analytic_flops": c.analytic_flops, "optimal_seconds": c.optimal_seconds,
            "estimated_seconds": c.estimated_seconds, "mfu": mfu, "collectives_static": c.hlo.collectives_static,
            "collectives_executed": c.hlo.collectives_executed, "unknown_loops": c.hlo.unknown_loops}
    out: dict[str, Any] = {
        "benchmark": "aot", "topology": config.tpu.topology, "chip": chip.name, "devices": mesh.size,
        "mesh": dict(mesh.shape), "hbm_bytes_per_device": capacity, "resident_bytes": resident,
        "fits": verdict.fits, "fit_message": verdict.message, "programs": figures,
        "workload": dataclasses.asdict(work) | {"grids": len(work.grids)},
    }
    by_name = {c.name: c for c in programs}
    if "grpo_gradients" in by_name:
        micro_batches = work.rows // work.micro_rows
        update_seconds = (micro_batches * by_name["grpo_gradients"].estimated_seconds
                          + by_name["apply_gradients"].estimated_seconds)
        update_flops = micro_batches * by_name["grpo_gradients"].analytic_flops
        hlo_update = micro_batches * by_name["grpo_gradients"].hlo.flops
        out["update"] = {"micro_batches": micro_batches, "estimated_seconds": update_seconds,
                         "analytic_flops": update_flops, "hlo_flops": hlo_update,
                         "analytic_over_hlo": update_flops / hlo_update if hlo_update else None,
                         "mfu": update_flops / (update_seconds * peak) if update_seconds else None}
        _say(f"\nGRPO update ({micro_batches} micro-batch(es) + apply_gradients): estimated "
             f"{update_seconds:.3f} s per step, MFU {out['update']['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s per "
             f"device; analytic / HLO FLOPs {out['update']['analytic_over_hlo']:.3f}")
    step = by_name["decode_step"]
    iterations = by_name["rollout_decode"].hlo.unknown_loop_seconds  # the decode loop's stages, one step each
    estimated = max(iterations) if iterations else step.estimated_seconds
    roofline = decode_roofline_seconds(resident, chip)
    out["decode_step"] = {"estimated_seconds": estimated, "standalone_seconds": step.estimated_seconds,
                          "roofline_seconds": roofline,
                          "fraction_of_roofline": roofline / estimated if estimated else None}
    _say(f"decode step (one iteration of the sampler's decode loop, its costliest stage): estimated "
         f"{estimated * 1e3:.2f} ms, HBM roofline {roofline * 1e3:.2f} ms (weights + KV cache per device at "
         f"{chip.hbm_bandwidth / 1e9:.0f} GB/s): {out['decode_step']['fraction_of_roofline']:.1%} of the roofline "
         f"(decode_step compiled alone: {step.estimated_seconds * 1e3:.2f} ms; it re-lays out the prompt cache and "
         f"gathers the LM head on every call, work the loop does once)")
    _say(verdict.message)
    return out


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    config = _CONFIG.value
    if "tpu" not in config:
        raise cli.UserError("--config has no `tpu` section: pass a TPU config, e.g. configs/tpu/inserter_3b_v5e_8.py")
    if jax.default_backend() != "cpu":
        _say(f"note: the default backend is {jax.default_backend()}; JAX_PLATFORMS=cpu keeps it on the CPU")
    result = report(config, _DUMP_HLO.value)
    print(json.dumps(result, default=float))
    if result["fits"] is False:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: another process may hold libtpu
    cli.run(main)
