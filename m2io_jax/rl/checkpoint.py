"""A training run's checkpoints: Orbax steps in `{workdir}/checkpoints`, resume checks, preemption, HF export.

One checkpoint (one Orbax step, written asynchronously and finalized atomically: a half-written step is
never listed) holds three items:
  params       the policy's parameters (the trainer's master dtype); restorable alone (`m2io_jax.export`);
  train_state  the rest of `Trainer.state()`: the optimizer state and, when beta != 0, the GRPO reference;
  meta         JSON: the position (stage "sft" / "grpo", the step within the stage, the length of the finished
               SFT stage), the seed, the data iterator's state (grain's `get_state()`), the run's config and
               the parameters' shapes and dtypes.
Orbax step numbers count the run's steps: SFT step s is s, GRPO step g is `sft_steps + g`. The rollout's
random numbers are a function of the configured seed and the step, so the seed and the position are the
whole RNG state.

The checkpoint directory goes through `etils.epath` and Orbax only, so the workdir may be a `gs://` path.
Restores take the target's shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from m2io_jax import cli, models
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

CHECKPOINT_DIR = "checkpoints"
STAGES = ("sft", "grpo")
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run stopped early on purpose; rerunning the command resumes it

RESUMABLE_FIELDS = (
    "sft.num_steps", "grpo.num_steps", "sft.optimizer.total_steps", "optimizer.total_steps",
    "log_every", "print_every", "samples_every", "num_samples_logged", "max_nonfinite_in_a_row", "eval",
    "checkpoint", "mesh", "distributed", "profile", "systems",
    "compilation_cache_dir",
)
"""Config fields (and sections) that may differ on resume; any other changed field stops the run."""

_COPIED_FILES = ("chat_template.json", "generation_config.json")  # Hugging Face files save_pretrained does not write


class Preempted(Exception):
    """The run saved a checkpoint on SIGTERM or Orbax's preemption signal and stopped; rerun to resume."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run is: `step` steps of `stage` done, after an SFT stage of `sft_steps` steps."""

    stage: str
    step: int
    sft_steps: int

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Position.stage={self.stage!r}: expected one of {STAGES}")

    @property
    def run_step(self) -> int:
        """The Orbax step number: steps of the whole run."""
        return self.step if self.stage == "sft" else self.sft_steps + self.step

    def reached(self, stage: str, step: int) -> bool:
        """Whether step `step` of `stage` is at or before this position."""
        return (STAGES.index(stage), step) <= (STAGES.index(self.stage), self.step)


@dataclasses.dataclass(frozen=True)
class Saved:
    """The meta item of a saved checkpoint."""

    position: Position
    seed: int
    data_state: dict[str, Any]
    config: dict[str, Any]
    param_shapes: dict[str, list]  # key path -> [shape, dtype]


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A JSON config as {dotted key: leaf value}."""
    out = {}
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, key + "."))
        else:
            out[key] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == field or key.startswith(field + ".") for field in RESUMABLE_FIELDS)


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: str) -> None:
    """Raises UserError naming every field (other than `RESUMABLE_FIELDS`) that differs between the configs."""
    old, new = flat_config(saved), flat_config(current)
    changed = sorted(k for k in set(old) | set(new) if not _resumable(k) and old.get(k, "<absent>")
                     != new.get(k, "<absent>"))
    if changed:
        details = ", ".join(f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in changed[:10])
        raise cli.UserError(
            f"the config differs from the one the checkpoints in {directory} were saved with: {details}"
            f"{' and more' if len(changed) > 10 else ''}. Resume with the same settings (only "
            f"{', '.join(RESUMABLE_FIELDS)} may change) or use a new --workdir")


def shapes_of(tree: Any) -> dict[str, list]:
    """{key path: [shape, dtype]} of the arrays of `tree`."""
    return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)]
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(saved: Mapping[str, list], target: Mapping[str, list], directory: str) -> None:
    """Raises UserError when the saved parameters' shapes are not the target model's (never a silent re-init)."""
    problems = [f"{k} missing in the checkpoint" for k in target if k not in saved]
    problems += [f"{k} not in the model" for k in saved if k not in target]
    problems += [f"{k} saved {saved[k][0]}, model {target[k][0]}" for k in target
                 if k in saved and list(saved[k][0]) != list(target[k][0])]
    if problems:
        raise cli.UserError(
            f"the checkpoint in {directory} holds a model of another shape than this run's: "
            f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Use the model it was trained with "
            f"or a new --workdir")


def abstract(tree: Any) -> Any:
    """`tree` as shape / dtype / sharding structs: a restore target that places arrays like `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunCheckpoints:
    """The Orbax `CheckpointManager` of `{workdir}/checkpoints`, with the run's items (module docstring).

    Args:
      workdir: the run's directory (local or `gs://`).
      settings: `config.checkpoint`: every_steps, keep, asynchronous.
      read_only: only reads (the export): creates, saves and deletes nothing.
    """

    def __init__(self, workdir: str, settings: ml_collections.ConfigDict, *, read_only: bool = False):
        if settings.every_steps < 1 or settings.keep < 1:
            raise cli.UserError(f"config.checkpoint: every_steps={settings.every_steps} and keep={settings.keep} "
                                f"must be >= 1")
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self.every_steps = settings.every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=settings.keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=settings.asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "train_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def saved(self, step: int | None = None) -> Saved | None:
        """The meta item of `step` (default: the latest); None when the directory holds no checkpoint."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        if step not in self.manager.all_steps():
            raise cli.UserError(f"{self.directory} has no checkpoint of step {step}; it holds steps "
                                f"{list(self.manager.all_steps())}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return Saved(position=Position(**meta["position"]), seed=meta["seed"], data_state=meta["data_state"],
                     config=meta["config"], param_shapes=meta["param_shapes"])

    def save(self, position: Position, state: Mapping[str, Any], *, seed: int, data_state: Mapping[str, Any],
             config: Mapping[str, Any]) -> None:
        """Saves `state` (`Trainer.state()`) at `position` unless that step is saved already.

        Returns once the arrays are copied out of the device buffers (the next step may donate them); the
        files are written in the background when asynchronous.
        """
        if self.manager.latest_step() == position.run_step:
            return
        rest = {k: v for k, v in state.items() if k != "params"}
        meta = {"position": dataclasses.asdict(position), "seed": seed, "data_state": dict(data_state),
                "config": dict(config), "param_shapes": shapes_of(state["params"])}
        self.manager.save(position.run_step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), train_state=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave(meta)))

    def due(self, position: Position) -> bool:
        """Whether the configured cadence saves at `position`."""
        return position.run_step % self.every_steps == 0

    def restore(self, step: int, target: Mapping[str, Any]) -> dict[str, Any]:
        """The state saved at `step`, laid out like `target` (`Trainer.state()`: its shapes and shardings)."""
        saved = self.saved(step)
        check_shapes(saved.param_shapes, shapes_of(target["params"]), str(self.directory))
        rest = {k: v for k, v in target.items() if k != "params"}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(target["params"])),
            train_state=ocp.args.StandardRestore(abstract(rest))))
        return {"params": restored.params, **restored.train_state}

    def restore_params(self, step: int, target: Any) -> Any:
        """The parameters saved at `step` in the structure and shardings of `target`, in their saved dtypes."""
        saved = self.saved(step)
        check_shapes(saved.param_shapes, shapes_of(target), str(self.directory))
        dtypes = {k: v[1] for k, v in saved.param_shapes.items()}
        target = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.ShapeDtypeStruct(x.shape, dtypes[jax.tree_util.keystr(path)], sharding=x.sharding),
            target)
        return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params

    def reached_preemption(self, position: Position) -> bool:
        """Orbax's preemption signal, agreed by all processes (False in a single process without jax.distributed)."""
        return self.manager.reached_preemption(position.run_step)

    def close(self) -> None:
        """Waits for the background writes to finish and closes the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


class SigtermFlag:
    """Records a SIGTERM instead of dying, so the run can finish its step, save and exit.

    Installed only in a single-process run on the main thread: with `jax.distributed`, JAX's preemption service
    owns SIGTERM and Orbax's `reached_preemption` reports it to all processes at the same step.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        print("SIGTERM received: finishing this step, then saving a checkpoint and stopping", flush=True)

    def __enter__(self) -> SigtermFlag:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def save_hf_model(model: Any, processor: Qwen2_5_VLProcessor, source: str, path: str) -> None:
    """`model` as a Hugging Face directory at `path`, with the tokenizer, preprocessor and chat template files
    (those of the `source` directory the model was first loaded from)."""
    models.save_pretrained(model, path)  # every process takes part in gathering the weights
    if jax.process_index() != 0:
        return
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    for name in _COPIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(path, name))

