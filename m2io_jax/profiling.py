"""Profiling a training run: a `jax.profiler` trace of chosen steps, and per-step MFU and rollout-roofline figures.

Settings, section `profile` of the training config (`get_profile_config`):
  stage       the stage whose steps are traced: "sft" or "grpo"
  start_step  the first traced step of that stage (1-based; the stage's first step also compiles)
  num_steps   how many steps are traced; 0: no trace
  chip        whose peak FLOP/s and HBM bandwidth the figures divide by: "auto" (the chip of
              `jax.devices()[0].device_kind` in `m2io_jax.chips`), a chip name ("v4", "v5e", "v5p", "v6e"), or
              "none"; on a device with no entry (CPU, GPU) "auto" logs no MFU and no roofline, and says so once

The trace goes to `{workdir}/profile` (`jax.profiler.start_trace`: `plugins/profile/<time>/<host>.xplane.pb` and a
`.trace.json.gz` per process; a gs:// workdir is written by the profiler itself, as MaxText's traces are; untested
here), each traced step inside a `StepTraceAnnotation` named after its stage with its step number, which
TensorBoard's profile plugin and XProf use to split the timeline into steps.

Figures added to each step's metrics (`Profiler.figures`), from the step's own shapes (each prompt's length and
images, the completions' mean length) and the trainer's time split. They are the whole run's: every process
steps through the same global batch, sharded over all devices (`jax.devices()`, one per chip on a TPU VM):
  perf/flops                  analytic FLOPs of the step's device programs (`m2io_jax.flops`): GRPO: vision tower,
                              rollout (prefill + decode steps), reference and old log-probs where they run, the
                              update(s); SFT: vision tower and the update. Padding is not counted (each prompt at its
                              own length), so this is model FLOPs, not what the padded programs execute.
  perf/mfu                    perf/flops / (step seconds x chips x the chip's peak bf16 FLOP/s), step seconds being
                              the trainer's time/* split (the data wait excluded)
  perf/rollout_tokens_per_second
                              generated tokens (completion_length x prompts x G) / time/rollout (GRPO)
  perf/rollout_ceiling_tokens_per_second
                              the HBM-bandwidth ceiling of decoding: every decode step reads the decoder's weights
                              once, so at most bandwidth x tensor-parallel devices x rows / weight bytes tokens per
                              second (rows = prompts x G; weights in the compute dtype; the KV cache's reads and the
                              prefill are left out, so the ceiling is an upper bound)
  perf/rollout_roofline_fraction
                              the two above divided: how close the rollout, prefill included, comes to the bound
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from m2io_jax import chips, flops
from m2io_jax.models import lora
from m2io_jax.rl import steps
from m2io_jax.run_log import say

STAGES = ("sft", "grpo")
PROFILE_DIR = "profile"


def get_profile_config() -> ml_collections.ConfigDict:
    """The `profile` section's defaults: no trace; MFU and roofline figures for the chip in use, where known."""
    c = ml_collections.ConfigDict()
    c.stage = "grpo"
    c.start_step = 2
    c.num_steps = 0
    c.chip = "auto"
    return c


def resolve_chip(name: str, device_kind: str) -> chips.Chip | None:
    """The chip that `profile.chip` names: "auto" looks up `device_kind`, "none" is None, else a `chips.CHIPS` key."""
    if name == "auto":
        return chips.chip_for(device_kind)
    if name == "none":
        return None
    if name not in chips.CHIPS:
        raise ValueError(f"config profile.chip={name!r}; expected 'auto', 'none' or one of {sorted(chips.CHIPS)}")
    return chips.CHIPS[name]


def step_seconds(metrics: Mapping[str, float]) -> float:
    """The trainer's own time for a step: the sum of its time/* split, the data wait (time/data) excluded."""
    return sum(v for k, v in metrics.items() if k.startswith("time/") and k != "time/data")


class _StageModel:
    """What a stage's FLOPs and decode weight bytes depend on, read once from the model and its trainer config."""

    def __init__(self, stage: str, model: nnx.Module, trainer_config: ml_collections.ConfigDict):
        self.stage = stage
        self.config = model.config
        self.adapters = lora.has_adapters(model)
        graphdef, params = nnx.split(model)
        self.train_vision = steps.StepSpec.create(
            graphdef, params, temperature=1.0, suppress_tokens=(), grpo_config=trainer_config.grpo,
            optimizer_config=trainer_config.optimizer, mesh=None, vision_parameters=model.vision_parameters,
            adapters=self.adapters).train_vision
        grpo = trainer_config.grpo
        self.num_samples = grpo.num_generations if stage == "grpo" else 1
        self.beta = float(grpo.beta)
        self.num_iterations = int(grpo.num_iterations)
        text = flops.text_config(self.config)
        weights = (flops.linear_per_token(text) + flops.head_per_token(text)) / 2  # matmul weights, 2 FLOPs each
        self.weight_bytes = weights * np.dtype(trainer_config.optimizer.compute_dtype).itemsize

    def flops(self, batch: Sequence[Any], metrics: Mapping[str, float]) -> float:
        """Analytic FLOPs of one step over `batch` (PromptExamples: prompt_ids, images, target_ids)."""
        total = 0.0
        for example in batch:
            prompt_length = len(example.prompt_ids)
            grids = [] if example.images is None else [tuple(int(n) for n in g)
                                                       for g in example.images["image_grid_thw"]]
            if self.stage == "grpo":
                programs = flops.grpo_step(
                    self.config, 1, self.num_samples, prompt_length, max(1, round(metrics["completion_length"])),
                    beta=self.beta, num_iterations=self.num_iterations, lora=self.adapters,
                    train_vision=self.train_vision, grids=grids)
            else:
                programs = {"update": flops.grpo_update(self.config, 1, 1, prompt_length, len(example.target_ids),
                                                        lora=self.adapters, train_vision=self.train_vision,
                                                        grids=grids)}
                if grids:
                    programs["vision"] = flops.vision_forward(self.config.vision, grids)
            total += sum(parts.total for parts in programs.values())
        return total


class Profiler:
    """The trace of `profile.num_steps` steps from `profile.start_step` of `profile.stage`, and the per-step figures.

    The training loop calls, per stage, `start_stage(stage, model, trainer_config)` once, then for each step
    `with profiler.step(stage, step): metrics = trainer.<stage>_step(...)` and
    `metrics.update(profiler.figures(stage, batch, metrics))`; `close()` (or leaving `with Profiler(...)`) stops
    a trace still running, e.g. when a stage ends or fails inside the window.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None,
                 devices: Sequence[Any] | None = None, log: Callable[[str], None] = say):
        if config.stage not in STAGES:
            raise ValueError(f"config profile.stage={config.stage!r}; expected one of {STAGES}")
        if config.num_steps < 0 or config.start_step < 1:
            raise ValueError(f"config profile.start_step={config.start_step}, num_steps={config.num_steps}; "
                             f"expected start_step >= 1 and num_steps >= 0 (0: no trace)")
        devices = list(jax.devices() if devices is None else devices)
        self.config = config
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.log = log
        self.chip = resolve_chip(config.chip, devices[0].device_kind)
        self.num_chips = len(devices)
        self.tensor_parallel = 1 if mesh is None else int(mesh.shape.get("tensor", 1))
        self.tracing = False
        self.done = config.num_steps == 0  # the window is over (or empty): no trace starts any more
        self.stages: dict[str, _StageModel] = {}
        if self.chip is None:
            log(f"profile: no MFU or rollout roofline in the logs: device kind {devices[0].device_kind!r} has no "
                f"entry in m2io_jax.chips (profile.chip={config.chip!r}; name a chip to use its figures)")

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start_stage(self, stage: str, model: nnx.Module, trainer_config: ml_collections.ConfigDict) -> None:
        """Reads what the stage's FLOPs depend on: the model's shapes, adapters, whether the tower trains (the
        optimizer's param_rules), G, beta and the iterations (the config the stage's Trainer gets)."""
        self.stages[stage] = _StageModel(stage, model, trainer_config)

    @property
    def last_step(self) -> int:
        return self.config.start_step + self.config.num_steps - 1

    def _in_window(self, stage: str, step: int) -> bool:
        return not self.done and stage == self.config.stage and self.config.start_step <= step <= self.last_step

    @contextlib.contextmanager
    def step(self, stage: str, step: int) -> Iterator[None]:
        """Runs one step, traced when it is in the window: the trace starts at the window's first step run (a
        resumed run traces the rest of the window) and stops after its last, or when the step raises."""
        if not self._in_window(stage, step):
            yield
            return
        if not self.tracing:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
            self.log(f"profile: tracing {stage} steps {step}-{self.last_step} into {self.directory}")
        try:
            with jax.profiler.StepTraceAnnotation(stage, step_num=step):
                yield
        except BaseException:
            self.close()
            raise
        if step == self.last_step:
            self.close()

    def close(self) -> None:
        """Stops and writes the trace when one is running."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            self.done = True
            self.log(f"profile: trace written under {self.directory}/plugins/profile "
                     f"(tensorboard --logdir {self.directory}, or xprof)")

    def figures(self, stage: str, batch: Sequence[Any], metrics: Mapping[str, float]) -> dict[str, float]:
        """The step's perf/* figures (module docstring) from its batch and the trainer's metrics."""
        if stage not in self.stages:
            raise ValueError(f"profiling: no start_stage({stage!r}, ...) before its steps' figures")
        model = self.stages[stage]
        out = {"perf/flops": model.flops(batch, metrics)}
        seconds = step_seconds(metrics)
        if self.chip is not None and seconds > 0:
            out["perf/mfu"] = out["perf/flops"] / (seconds * self.num_chips * self.chip.peak_bf16_flops)
        if stage == "grpo" and metrics.get("time/rollout", 0.0) > 0:
            rows = len(batch) * model.num_samples
            out["perf/rollout_tokens_per_second"] = metrics["completion_length"] * rows / metrics["time/rollout"]
            if self.chip is not None:
                ceiling = self.chip.hbm_bandwidth * self.tensor_parallel * rows / model.weight_bytes
                out["perf/rollout_ceiling_tokens_per_second"] = ceiling
                out["perf/rollout_roofline_fraction"] = out["perf/rollout_tokens_per_second"] / ceiling
        return out
