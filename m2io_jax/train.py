"""Trains the inserter: SFT on gold insertions, then GRPO, with held-out evaluation after each stage.

    python -m m2io_jax.train --config=configs/tiny.py --workdir=/tmp/tiny_run
    python -m m2io_jax.train --config=configs/tiny.py --workdir=/tmp/run --config.grpo.num_steps=50

Settings: `--config` (default `m2io_jax/train_config.py`, whose docstring lists every section), overridden by
`--config.x=`; the stage lengths are `config.sft.num_steps` and `config.grpo.num_steps`.

The run: read the datasets (`inserter.sources`); take the model from `config.model.checkpoint` or build a tiny
Qwen2.5-VL into `{workdir}/init` (tokenizer trained on this corpus and the rendered completions); retrieve,
build candidates and prompts once for the train and validation splits (`inserter.pipeline`); run the SFT stage
then the GRPO stage through `m2io_jax.rl.trainer.Trainer` with the inserter's reward (`inserter.task`);
evaluate greedily on the validation split before training and after each stage (`inserter.evaluation`).

Writes in the workdir:
  config.json     the config of the run
  run.json        git commit (and whether the tree had changes), package versions, devices, command line
  data.json       the pipeline's counts per split and dataset (truncated / over-budget prompts, ...)
  metrics.jsonl   one JSON object per logged step: step, stage ("sft" / "grpo"), the trainer's metrics
                  (losses, rewards and their components, tied groups, time/* split) and time/data
  eval.json       {stage: {metric: value}} for the stages "rule" (the caption-similarity baseline, its threshold
                  chosen on validation), "init" (before training), "sft" and "grpo"
  sft/, final/    the model after SFT and at the end, as Hugging Face directories with the tokenizer and the
                  preprocessor config (`m2io_jax.models.from_pretrained` loads them)
  checkpoints/    Orbax checkpoints (`m2io_jax.rl.checkpoint`): every config.checkpoint.every_steps steps, at each
                  stage's end and on SIGTERM / preemption (then the run exits with status 75). A run whose
                  workdir holds checkpoints resumes from the latest (stage, step, data position), after checking
                  that the config differs only in fields a user may change (`checkpoint.RESUMABLE_FIELDS`);
                  `python -m m2io_jax.export` writes one as a Hugging Face directory
and prints one progress line per logged step with the time per step and the ETA of the run.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags
from etils import epath
from flax import nnx

from m2io_jax import cli, fit, models, profiling, sharding, train_config
from m2io_jax.buckets import bucket_size
from m2io_jax.inserter import evaluation, pipeline, sources
from m2io_jax.inserter.task import RewardAdapter
from m2io_jax.models import lora, sentence_encoder, tiny
from m2io_jax.models.qwen2_5_vl_processor import IMAGE_PAD, Qwen2_5_VLProcessor
from m2io_jax.rl.checkpoint import (
    PREEMPTED_EXIT,
    Position,
    Preempted,
    RunCheckpoints,
    SigtermFlag,
    check_config,
    flat_config,
    save_hf_model,
)
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from m2io_jax.run_log import (
    JsonLines,
    RunLog,
    check_writable,
    is_local,
    is_main_process,
    read_json,
    say,
    write_json,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "directory for the run's outputs (created if missing; required)",
                               allow_override=True)
_CONFIG = cli.define_config(train_config, "training settings (default: m2io_jax/train_config.py)")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "transformers", "tokenizers", "numpy", "ml-collections",
            "tensorflow-datasets", "scann", "m2io-jax")
SPLITS = ("train", "validation")


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in `directory` ("" leaves it off)."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_record(argv: Sequence[str]) -> dict[str, Any]:
    """The git commit of the package's checkout (None outside one), package versions, devices and command line."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "packages": versions, "python": sys.version.split()[0],
            "devices": [str(d) for d in jax.devices()], "argv": list(argv)}


def local_dir(workdir: str, name: str) -> str:
    """`{workdir}/{name}` when the workdir is on this machine; else a directory of this process's own under
    ~/.cache/m2io_jax (files that readers open by local path: the tiny model, TFDS images)."""
    if is_local(workdir):
        return os.path.join(workdir, name)
    key = hashlib.sha256(workdir.encode()).hexdigest()[:16]
    return os.path.expanduser(os.path.join("~/.cache/m2io_jax/workdirs", key, str(jax.process_index()), name))


def copy_files(source: epath.Path, target: epath.Path) -> None:
    """The files of directory `source` into `target` (created if missing), either side local or remote."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        file.copy(target / file.name, overwrite=True)


def local_copy(workdir: str, name: str) -> str:
    """A local path of the directory `{workdir}/{name}` (copied into `local_dir` from a remote workdir)."""
    if is_local(workdir):
        return os.path.join(workdir, name)
    target = local_dir(workdir, name)
    copy_files(epath.Path(workdir) / name, epath.Path(target))
    return target


def save_model_dir(model: Any, processor: Qwen2_5_VLProcessor, source: str, workdir: str, name: str) -> None:
    """`model` as the Hugging Face directory `{workdir}/{name}` (all processes gather; process 0 writes; on a
    remote workdir it is written locally first and copied up)."""
    if is_local(workdir):
        save_hf_model(model, processor, source, os.path.join(workdir, name))
        return
    with tempfile.TemporaryDirectory() as staging:
        save_hf_model(model, processor, source, staging)
        if is_main_process():
            copy_files(epath.Path(staging), epath.Path(workdir) / name)


def model_checkpoint(config: ml_collections.ConfigDict, datasets: Sequence[sources.SplitDataset], workdir: str) -> str:
    """`config.model.checkpoint`, or a tiny Qwen2.5-VL built into `{workdir}/init` (kept when already there)."""
    if config.model.checkpoint:
        if not os.path.isfile(os.path.join(config.model.checkpoint, "config.json")):
            raise cli.UserError(f"config.model.checkpoint={config.model.checkpoint}: no config.json there (expected "
                                f"a local Hugging Face Qwen2.5-VL directory)")
        return config.model.checkpoint
    path = local_dir(workdir, "init")
    shared = is_local(workdir)  # one directory for all processes: process 0 builds it, the others wait
    if not os.path.isfile(os.path.join(path, "config.json")) and (is_main_process() or not shared):
        spec = config.model.tiny
        texts = pipeline.tokenizer_texts(datasets, config.inserter, max_images=config.data.candidates.max_images)
        tiny.build_tiny_checkpoint(path, texts, kind="qwen2_5_vl", vocab_size=spec.vocab_size,
                                   text_shape=spec.text_shape.to_dict(), vision_shape=spec.vision_shape.to_dict(),
                                   seed=spec.seed, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    if jax.process_count() > 1:
        sharding.wait_for_all_processes("tiny model built")  # no device collective: no 30 s gloo timeout
    return path


def prepare_examples(config: ml_collections.ConfigDict, datasets: Sequence[sources.SplitDataset],
                     processor: Qwen2_5_VLProcessor, retrievers: Mapping[str, Any],
                     splits: Sequence[str] = SPLITS) -> tuple[dict[str, list[pipeline.PromptExample]], dict]:
    """The examples of each of `splits` over all datasets (`retrievers`: one per dataset name,
    `pipeline.build_retrievers`), and the pipeline's counts of each."""
    examples: dict[str, list[pipeline.PromptExample]] = {split: [] for split in splits}
    counts: dict[str, dict[str, dict[str, int]]] = {split: {} for split in splits}
    for ds in datasets:
        for split in splits:
            found, split_counts = pipeline.build_examples(
                ds, split, retriever=retrievers[ds.name], processor=processor, data=config.data,
                inserter=config.inserter, pipeline=config.pipeline)
            examples[split] += found
            counts[split][ds.name] = dict(split_counts)
    return examples, counts


def stage_trainer_config(config: ml_collections.ConfigDict,
                         optimizer: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The trainer config of a stage: the run's grpo and rollout sections with `optimizer` (SFT: config.sft's)."""
    return ml_collections.ConfigDict({"grpo": config.grpo, "optimizer": optimizer, "rollout": config.rollout})


def prompt_batch(batch: Sequence[pipeline.PromptExample], *, with_targets: bool) -> PromptBatch:
    return PromptBatch(token_ids=[list(e.prompt_ids) for e in batch], images=[e.images for e in batch],
                       examples=[e.example for e in batch],
                       targets=[list(e.target_ids) for e in batch] if with_targets else None)


def check_fit(config: ml_collections.ConfigDict, model: Any, train_examples: Sequence[pipeline.PromptExample],
              sft_examples: Sequence[pipeline.PromptExample], suppress_tokens: Sequence[int],
              mesh: jax.sharding.Mesh | None) -> None:
    """`fit.check` before step 0 for each stage that runs, on its longest prompts and the model as its trainer
    gets it (GRPO: with `config.lora`'s adapters, abstract here: no memory); prints each report (skipped where
    the backend reports no memory) and stops with its message when a stage does not fit."""
    stages = []
    if config.sft.num_steps > 0 and sft_examples:
        sft_config = stage_trainer_config(config, config.sft.optimizer)
        r = config.rollout
        target = bucket_size(max(len(e.target_ids) for e in sft_examples), tuple(r.completion_lengths),
                             r.min_completion_length, "target length")
        stages.append(("sft", model, sft_config, sft_examples, config.sft.batch_size, target))
    if config.grpo.num_steps > 0:
        adapted = nnx.eval_shape(lambda: lora.apply_config(nnx.clone(model), config.lora))
        stages.append(("grpo", adapted, config, train_examples, config.grpo.batch_size,
                       config.rollout.max_new_tokens))
    for stage, stage_model, stage_config, stage_examples, batch_size, completion_length in stages:
        batch = [stage_examples[i] for i in fit.longest([e.prompt_ids for e in stage_examples], batch_size)]
        report = fit.check(stage_model, stage_config, stage=stage, prompts=[list(e.prompt_ids) for e in batch],
                           images=[e.images for e in batch], completion_length=completion_length,
                           suppress_tokens=suppress_tokens, mesh=mesh)
        say(report.message)
        if report.fits is False:
            raise cli.UserError(report.message)


class Progress:
    """metrics.jsonl and TensorBoard scalars (every `log_every` steps), a console line (every `print_every` steps)
    with the ETA, sampled completions as TensorBoard text (every `samples_every` GRPO steps, from `samples`), and
    the stop after `max_nonfinite_in_a_row` steps in a row whose update was skipped for a NaN or infinite loss.

    The ETA is the remaining steps of this and later stages at the mean time of the last `_RECENT` steps (the
    first steps of a stage also compile, so a mean over all steps would overstate the rest).
    """

    _RECENT = 20

    def __init__(self, workdir: str, stage_steps: dict[str, int], *, log_every: int, print_every: int,
                 run_log: RunLog, max_nonfinite_in_a_row: int, samples_every: int = 0,
                 samples: Callable[[], list[str]] | None = None, resumed: Position | None = None):
        keep = None if resumed is None else (lambda record: resumed.reached(record["stage"], record["step"]))
        self.records = JsonLines(os.path.join(workdir, "metrics.jsonl"), keep=keep)
        self.run_log = run_log
        self.max_nonfinite_in_a_row = max(1, max_nonfinite_in_a_row)
        self.nonfinite_in_a_row = 0
        self.samples_every = samples_every
        self.samples = samples
        self.stage_steps = stage_steps
        self.log_every = max(1, log_every)
        self.print_every = max(1, print_every)
        self.durations: dict[str, list[float]] = collections.defaultdict(list)

    def eta_seconds(self, stage: str) -> float:
        recent = self.durations[stage][-self._RECENT:]
        stages = list(self.stage_steps)
        remaining = self.stage_steps[stage] - len(self.durations[stage])
        remaining += sum(self.stage_steps[s] for s in stages[stages.index(stage) + 1:])
        return sum(recent) / len(recent) * remaining

    def log(self, stage: str, step: int, seconds: float, metrics: dict[str, float]) -> None:
        self.durations[stage].append(seconds)
        last = step == self.stage_steps[stage]
        if step % self.log_every == 0 or last:
            self.records.append({"step": step, "stage": stage, **metrics})
            self.run_log.scalars(stage, step, metrics)
        if stage == "grpo" and self.samples is not None and self.samples_every and step % self.samples_every == 0:
            self.run_log.texts("grpo/samples", step, self.samples())
        if step % self.print_every == 0 or last:
            key = "loss" if stage == "sft" else "reward/mean"
            eta = self.eta_seconds(stage)
            say(f"[{stage} {step}/{self.stage_steps[stage]}] {key}={metrics.get(key, math.nan):.4f} "
                  f"{seconds:.2f} s/step, ETA {int(eta // 60)}:{int(eta % 60):02d}")
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if metrics.get("skipped_nonfinite") else 0
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise cli.UserError(
                f"{stage} step {step}: the loss or gradient was NaN or infinite in {self.nonfinite_in_a_row} steps "
                f"in a row (config.max_nonfinite_in_a_row={self.max_nonfinite_in_a_row}); their updates were "
                f"skipped. Check the rewards (metrics.jsonl), lower the learning rate or compute in float32")


def run_stage(stage: str, trainer: Trainer, batches: Iterator[list[pipeline.PromptExample]], num_steps: int,
              progress: Progress, *, first_step: int, after_step: Callable[[int], None],
              profiler: profiling.Profiler) -> None:
    """Steps `first_step + 1 .. num_steps` of `stage` ("sft" / "grpo"), each logged with the time spent waiting
    for data, then handed to `after_step` (checkpoints)."""
    for step in range(first_step + 1, num_steps + 1):
        start = time.perf_counter()
        batch = next(batches)
        data_seconds = time.perf_counter() - start
        with profiler.step(stage, step):
            if stage == "sft":
                metrics = trainer.sft_step(prompt_batch(batch, with_targets=True))
            else:
                metrics = trainer.grpo_step(prompt_batch(batch, with_targets=False), step)
        metrics = {**metrics, "time/data": data_seconds}
        metrics.update(profiler.figures(stage, batch, metrics))
        progress.log(stage, step, time.perf_counter() - start, metrics)
        after_step(step)
    profiler.close()  # a trace window that runs past the stage's last step ends with the stage


def train(config: ml_collections.ConfigDict, workdir: str, argv: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Runs the training described in the module docstring; returns eval.json's content."""
    sharding.initialize_distributed(config.distributed)
    check_writable(workdir)
    enable_compilation_cache(config.compilation_cache_dir)
    config_json = json.loads(config.to_json_best_effort())
    checkpoints = RunCheckpoints(workdir, config.checkpoint)
    resumed = checkpoints.saved()
    if resumed is not None:
        check_config(resumed.config, config_json, str(checkpoints.directory))
        say(f"resuming from {checkpoints.directory}: {resumed.position.stage} step {resumed.position.step}")
    write_json(os.path.join(workdir, "config.json"), config_json)
    write_json(os.path.join(workdir, "run.json"), run_record(argv))

    datasets = sources.load_datasets(config.data, image_dir=local_dir(workdir, "images"))
    checkpoint = model_checkpoint(config, datasets, workdir)
    mesh = sharding.make_mesh(config.mesh.to_dict()) if config.mesh else None
    overrides = flat_config(config.model.overrides.to_dict())
    model = models.from_pretrained(checkpoint, mesh=mesh, overrides=overrides)
    processor = Qwen2_5_VLProcessor.from_pretrained(checkpoint, config=model.config, **config.model.processor)
    encoder = sentence_encoder.load_encoder(config.data.retrieval.encoder_path)
    examples, counts = prepare_examples(config, datasets, processor,
                                        pipeline.build_retrievers(datasets, config.data, encoder))
    write_json(os.path.join(workdir, "data.json"), counts)
    for split in SPLITS:
        totals = collections.Counter()
        for dataset_counts in counts[split].values():
            totals.update(dataset_counts)
        say(f"{split}: {totals['examples']} examples of {totals['questions']} questions; over the prompt budget: "
              f"{totals['truncated']} truncated ({totals['dropped_candidates']} candidates dropped), "
              f"{totals['over_budget']} left out (data.json)")
    sft_examples = [e for e in examples["train"] if e.target_ids is not None]
    validation = examples["validation"][:config.eval.max_examples or None]
    if not validation:
        raise cli.UserError("the validation split has no example: evaluation needs at least one "
                            "(see data.json for what the pipeline left out)")

    tokenizer = processor.tokenizer
    stop_tokens = pipeline.stop_token_ids(tokenizer)
    suppress_tokens = (tokenizer.convert_tokens_to_ids(IMAGE_PAD),)
    adapter = RewardAdapter(tokenizer, config.inserter, stop_tokens)
    check_fit(config, model, examples["train"], sft_examples, suppress_tokens, mesh)

    last_completions: list[Sequence[int]] = []  # the latest rollout's, for the sampled-text log

    def reward_fn(batch_examples: Sequence[Any], completions: Sequence[Sequence[int]]) -> RewardResult:
        last_completions[:] = completions
        scored = adapter(batch_examples, completions)
        return RewardResult(total=scored.total, components=scored.components, counts=scored.counts)

    def evaluate(policy: Any) -> dict[str, float]:
        return evaluation.evaluate(policy, validation, tokenizer=tokenizer, inserter=config.inserter,
                                   max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                   stop_tokens=stop_tokens, suppress_tokens=suppress_tokens)

    def samples() -> list[str]:
        return [tokenizer.decode(list(c)) for c in last_completions[:config.num_samples_logged]]

    results: dict[str, dict[str, float]] = {}
    if resumed is not None:
        results = read_json(os.path.join(workdir, "eval.json")) or {}
    run_log = RunLog(workdir)
    eval_steps = {"init": 0, "sft": config.sft.num_steps, "grpo": config.sft.num_steps + config.grpo.num_steps}

    def record_eval(stage: str, policy: Any) -> None:
        results[stage] = evaluate(policy)
        write_json(os.path.join(workdir, "eval.json"), results)
        run_log.scalars("eval", eval_steps[stage], results[stage])
        say(f"eval {stage}: " + " ".join(f"{k}={v:.4f}" for k, v in results[stage].items()))

    if config.eval.rule_baseline and "rule" not in results:
        threshold, scores = evaluation.choose_rule_threshold(validation, encoder, config.inserter)
        results["rule"] = {**scores, "threshold": threshold}
        say(f"eval rule (threshold {threshold} chosen on validation by reward): "
              + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        run_log.scalars("eval_rule", 0, results["rule"])
    if config.eval.before_training and "init" not in results:
        record_eval("init", model)
    stage_steps = {"sft": config.sft.num_steps, "grpo": config.grpo.num_steps}
    progress = Progress(workdir, {stage: n for stage, n in stage_steps.items() if n > 0},
                        log_every=config.log_every, print_every=config.print_every, run_log=run_log,
                        max_nonfinite_in_a_row=config.max_nonfinite_in_a_row, samples_every=config.samples_every,
                        samples=samples, resumed=None if resumed is None else resumed.position)
    profiler = profiling.Profiler(config.profile, workdir, mesh=mesh)
    seed = config.seed
    position = None if resumed is None else resumed.position

    def resume_stage(stage: str, trainer: Trainer, batches: Any) -> int:
        """Restores the trainer and the data iterator when the checkpoint is of `stage`; the steps done."""
        if position is None or position.stage != stage:
            return 0
        trainer.restore(checkpoints.restore(position.run_step, trainer.state()))
        batches.set_state(resumed.data_state)
        return position.step

    def checkpoint_after(stage: str, trainer: Trainer, batches: Any, sft_steps: int) -> Callable[[int], None]:
        """Saves on the configured cadence, at the stage's end and on preemption (then stops the run)."""
        def after_step(step: int) -> None:
            at = Position(stage, step, sft_steps)
            preempted = sigterm.received or checkpoints.reached_preemption(at)
            if preempted or checkpoints.due(at) or step == stage_steps[stage]:
                checkpoints.save(at, trainer.state(), seed=seed, data_state=batches.get_state(), config=config_json)
            if preempted:
                raise Preempted(f"preempted: stopped after {stage} step {step}, checkpoint saved in "
                                f"{checkpoints.directory}; run the same command again to resume")
        return after_step

    with SigtermFlag() as sigterm:
        try:
            if config.sft.num_steps > 0 and not (position is not None and position.stage == "grpo"):
                if not sft_examples:
                    raise cli.UserError("config.sft.num_steps > 0 but no training example has an SFT target (gold "
                                        "anchors unknown for all); set config.sft.num_steps=0")
                sft_config = stage_trainer_config(config, config.sft.optimizer)
                trainer = Trainer(model, sft_config, reward_fn=None, stop_tokens=stop_tokens,
                                  suppress_tokens=suppress_tokens, mesh=mesh)
                batches = pipeline.batches(sft_examples, batch_size=config.sft.batch_size, seed=seed)
                first_step = resume_stage("sft", trainer, batches)
                profiler.start_stage("sft", trainer.model, sft_config)
                run_stage("sft", trainer, batches, config.sft.num_steps, progress, first_step=first_step,
                          after_step=checkpoint_after("sft", trainer, batches, sft_steps=0), profiler=profiler)
                sft_steps = max(first_step, config.sft.num_steps)
                model = trainer.model
                save_model_dir(model, processor, checkpoint, workdir, "sft")
                record_eval("sft", model)
            else:
                sft_steps = 0 if position is None else position.sft_steps
                if sft_steps > 0 and config.lora.rank > 0:  # LoRA checkpoints hold the adapters alone; their
                    model = models.from_pretrained(local_copy(workdir, "sft"), mesh=mesh,  # base: the SFT model
                                                   overrides=overrides)
            if config.grpo.num_steps > 0:
                trainer = Trainer(lora.apply_config(model, config.lora), config, reward_fn=reward_fn,
                                  stop_tokens=stop_tokens, suppress_tokens=suppress_tokens, mesh=mesh)
                del model  # the trainer holds the weights now (with LoRA: the base once, in the compute dtype)
                batches = pipeline.batches(examples["train"], batch_size=config.grpo.batch_size, seed=seed + 1)
                first_step = resume_stage("grpo", trainer, batches)
                profiler.start_stage("grpo", trainer.model, config)
                run_stage("grpo", trainer, batches, config.grpo.num_steps, progress, first_step=first_step,
                          after_step=checkpoint_after("grpo", trainer, batches, sft_steps=sft_steps),
                          profiler=profiler)
                model = lora.merge(trainer.model)  # a plain model (no adapters) for evaluation and export
                record_eval("grpo", model)
        finally:
            profiler.close()
            checkpoints.close()
    save_model_dir(model, processor, checkpoint, workdir, "final")
    run_log.close()
    return results


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_WORKDIR)
    try:
        train(_CONFIG.value, _WORKDIR.value, sys.argv)
    except Preempted as stop:
        say(stop)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    cli.run(main)
