r"""Does the inserter learn? GRPO against honest controls on the demo corpus: the README's learning table.

    python -m m2io_jax.experiments.learning --config=configs/learning.py --seeds=3 --out=DIR

Every arm sees the same questions, retrieval (top-k chunks) and candidates (shuffled by `inserter.shuffle_seed`,
the same for every seed), and is scored on the test split, which makes no choice; the validation split makes
every choice (`learning` section, `m2io_jax.experiments.learning_config`):

  rule               the caption-similarity baseline, its threshold chosen on validation (deterministic: one
                     value for all seeds);
  sft                SFT from the tiny model of the seed, stopped at its validation plateau; the checkpoint of
                     the best validation evaluation;
  sft_continued      SFT continued from `sft` with the GRPO arm's optimizer settings for as many steps as GRPO
                     takes, with as many tokens seen per step: prompts + completions through the update's forward
                     and backward pass (`continued_sft_batch_size` 0 sizes its batch so);
  grpo               GRPO from `sft` (`config.grpo`, `config.optimizer`, `config.rollout`);
  sft_no_captions,   `sft` and `grpo` with captions withheld from the prompt (`inserter.prompt.show_captions`
  grpo_no_captions   off), so that only the images tell the candidates apart;
  sft_inline,        `sft` and `grpo` trained and scored in the inline output format (the answer rewritten with
  grpo_inline        its images), for the first `format_seeds` seeds.

The continued-SFT and GRPO arms evaluate on validation every `eval_every` steps and keep their best checkpoint
after step 0. A seed sets the tiny model's initialisation, the data order and the sampling. Each (variant, seed)
writes `{out}/{variant}/seed{seed}/arms.json` when done and is skipped when that file exists, so an interrupted
experiment resumes where it stopped; `{out}/results.json` holds every figure and `{out}/table.md` the tables.

Printed: the test table (image precision, recall, F1, ordering, placement accuracy, reward, decode tokens per
answer: mean +- standard deviation over seeds), the GRPO diagnostics (training reward, tied groups, KL, clip
fraction and entropy at the start and the end of training, against the SFT model's own sampled reward), the
formats table (quality, decode tokens and inserter seconds per answer), the verdict, and as the last line one
JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from m2io_jax import cli, models, systems, train, train_config
from m2io_jax.data.demo import build as demo_build
from m2io_jax.experiments import learning_config
from m2io_jax.inserter import evaluation, pipeline, sources
from m2io_jax.inserter.task import RewardAdapter, decode_completion
from m2io_jax.models import sentence_encoder
from m2io_jax.models.qwen2_5_vl_processor import IMAGE_PAD, Qwen2_5_VLProcessor
from m2io_jax.rl.checkpoint import flat_config
from m2io_jax.rl.trainer import RewardResult, Trainer
from m2io_jax.run_log import say, write_json

_OUT = flags.DEFINE_string("out", None, "directory for the experiment's runs, results.json and table.md (required)")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds per arm (0, 1, ...)", lower_bound=1)
_VARIANTS = flags.DEFINE_multi_enum("variants", ["anchors", "no_captions", "inline"],
                                    ["anchors", "no_captions", "inline"],
                                    "variants to train (anchors: rule, sft, sft_continued, grpo; no_captions: "
                                    "their captions-withheld sft and grpo; inline: the inline-format sft and grpo)")
_CONFIG = cli.define_config(train_config, "training settings with a `learning` section (configs/learning.py)")

SPLITS = ("train", "validation", "test")
VARIANTS = ("anchors", "no_captions", "inline")
ARMS = ("rule", "sft", "sft_continued", "grpo", "sft_no_captions", "grpo_no_captions")
FORMAT_ARMS = ("sft", "grpo", "sft_inline", "grpo_inline")
COLUMNS = {"P": "image_precision", "R": "image_recall", "F1": "image_f1", "Ord.": "ordering",
           "Place.": "placement_accuracy", "reward": "reward", "tokens": "decode_tokens"}
FORMAT_COLUMNS = {"F1": "image_f1", "Place.": "placement_accuracy", "reward": "reward",
                  "tokens": "decode_tokens", "s/answer": "seconds_per_answer"}
DIAGNOSTICS = ("reward/mean", "reward/format", "reward/selection", "reward/order", "reward/placement",
               "groups_all_tied", "kl", "clip_fraction", "entropy", "completion_length")
VERDICT_METRICS = ("image_f1", "placement_accuracy")


# ----------------------------------------------------------------------------------------------- data


def experiment_data(config: ml_collections.ConfigDict, settings: ml_collections.ConfigDict,
                    out: str) -> ml_collections.ConfigDict:
    """`config` with `data.data_dir` set to the demo corpus generated at `settings.corpus_scale` in
    `{out}/corpus` (generated once; a set data_dir is kept)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.data.data_dir or config.data.source != "mramg":
        return config
    corpus = os.path.join(out, f"corpus_x{settings.corpus_scale}")
    if not os.path.isfile(os.path.join(corpus, "done")):
        demo_build.generate(corpus, settings.corpus_scale)
        with open(os.path.join(corpus, "done"), "w") as f:
            f.write(f"scale {settings.corpus_scale}\n")
    config.data.data_dir = corpus
    return config


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The run config of a variant: "anchors" (as given), "no_captions" (captions withheld), "inline"."""
    config = ml_collections.ConfigDict(config.to_dict())
    if variant == "no_captions":
        config.inserter.prompt.show_captions = False
    elif variant == "inline":
        config.inserter.output_format = "inline"
    elif variant != "anchors":
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    return config


@dataclasses.dataclass
class VariantData:
    """What every seed of a variant shares: its config, tokenizer and the prompts of each split."""

    config: ml_collections.ConfigDict
    processor: Qwen2_5_VLProcessor
    examples: dict[str, list[pipeline.PromptExample]]
    stop_tokens: tuple[int, ...]
    suppress_tokens: tuple[int, ...]

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def seed_checkpoint(config: ml_collections.ConfigDict, datasets: Sequence[sources.SplitDataset], workdir: str,
                    seed: int) -> str:
    """The tiny model of `seed` (its weights' seed; the tokenizer, trained on the corpus, is the same for every
    seed) in `{workdir}/init`."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.tiny.seed = config.model.tiny.seed + seed
    return train.model_checkpoint(config, datasets, workdir)


def prepare_variant(config: ml_collections.ConfigDict, datasets: Sequence[sources.SplitDataset],
                    retrievers: Mapping[str, Any], checkpoint: str) -> VariantData:
    """The prompts of every split under the variant's config, tokenized by `checkpoint`'s tokenizer."""
    processor = Qwen2_5_VLProcessor.from_pretrained(checkpoint, **config.model.processor)
    examples, _ = train.prepare_examples(config, datasets, processor, retrievers, splits=SPLITS)
    for split in SPLITS:
        if not examples[split]:
            raise cli.UserError(f"the {split} split has no example under {config.data.data_dir}: the experiment "
                                f"needs every split (config.data.split)")
    tokenizer = processor.tokenizer
    return VariantData(config=config, processor=processor, examples=examples,
                       stop_tokens=pipeline.stop_token_ids(tokenizer),
                       suppress_tokens=(tokenizer.convert_tokens_to_ids(IMAGE_PAD),))


def same_tokenizer(first: str, other: str) -> None:
    """Raises unless the checkpoints `first` and `other` hold the same tokenizer.json (the prompts of a variant
    are tokenized once for all its seeds)."""
    def read(path: str) -> bytes:
        with open(os.path.join(path, "tokenizer.json"), "rb") as f:
            return f.read()
    if read(first) != read(other):
        raise RuntimeError(f"{other}/tokenizer.json differs from {first}/tokenizer.json: the tiny tokenizer must not "
                           f"depend on the seed")


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_split(model: Any, examples: Sequence[pipeline.PromptExample], data: VariantData, *,
                   timed: bool = False) -> dict[str, float]:
    """`evaluation.METRICS` of `model`'s greedy completions on `examples`, plus decode_tokens (mean per answer)
    and, when `timed`, seconds_per_answer: the wall time of a second pass of the batched greedy decoding (the
    first compiles each batch's prompt bucket) over the examples."""
    config = data.config

    def complete() -> list[list[int]]:
        return evaluation.greedy_completions(model, examples, max_new_tokens=config.eval.max_new_tokens,
                                             batch_size=config.eval.batch_size, stop_tokens=data.stop_tokens,
                                             suppress_tokens=data.suppress_tokens)
    completions = complete()
    texts = [decode_completion(data.tokenizer, ids, data.stop_tokens) for ids in completions]
    scores = evaluation.score_completions(texts, examples, config.inserter)
    scores["decode_tokens"] = float(np.mean([systems.completion_length(ids, data.stop_tokens) for ids in completions]))
    if timed:
        start = time.perf_counter()
        complete()
        scores["seconds_per_answer"] = (time.perf_counter() - start) / len(examples)
    return scores


# -------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A model's parameters on the host: a starting point several arms train from (trainers donate buffers)."""

    graphdef: Any
    state: Any

    @classmethod
    def of(cls, model: nnx.Module) -> "Snapshot":
        graphdef, state = nnx.split(model)
        return cls(graphdef, jax.device_get(state))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, self.state))


@dataclasses.dataclass
class TrainedArm:
    """One arm's training: the chosen checkpoint, its step, the validation curve and the per-step records."""

    best: Snapshot
    best_step: int
    curve: list[dict[str, float]]
    records: list[dict[str, float]]
    prompt_tokens: int
    completion_tokens: int


def train_arm(trainer: Trainer, stage: str, batches: Iterator[list[pipeline.PromptExample]], *, num_steps: int,
              validate: Callable[[Any], dict[str, float]], settings: ml_collections.ConfigDict,
              num_generations: int, early_stop: bool) -> TrainedArm:
    """Steps of `stage` ("sft" / "grpo") with a validation evaluation every `settings.eval_every` steps and at the
    last; keeps the best by `settings.select_metric` (an evaluation counts as better when it beats the best by
    more than `settings.min_delta`); `early_stop`: stops after `settings.patience` evaluations in a row without
    a better one (the SFT plateau). Counts the tokens the updates saw (prompts, and targets or completions)."""
    metric = settings.select_metric
    best: tuple[float, int, Snapshot] | None = None
    curve, records = [], []
    prompt_tokens = completion_tokens = 0
    stale = 0
    for step in range(1, num_steps + 1):
        batch = next(batches)
        prompt_tokens += sum(len(e.prompt_ids) for e in batch)
        if stage == "sft":
            metrics = trainer.sft_step(train.prompt_batch(batch, with_targets=True))
            completion_tokens += sum(len(e.target_ids) for e in batch)
        else:
            metrics = trainer.grpo_step(train.prompt_batch(batch, with_targets=False), step)
            completion_tokens += round(metrics["completion_length"] * len(batch) * num_generations)
        records.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if step % settings.eval_every and step != num_steps:
            continue
        scores = validate(trainer.model)
        curve.append({"step": step, **scores})
        say(f"  [{stage} {step}/{num_steps}] validation {metric}={scores[metric]:.4f} "
            f"F1={scores['image_f1']:.4f} place={scores['placement_accuracy']:.4f}")
        if best is None or scores[metric] > best[0] + settings.min_delta:
            best, stale = (scores[metric], step, Snapshot.of(trainer.model)), 0
        else:
            stale += 1
            if early_stop and stale >= settings.patience:
                break
    if best is None:
        raise ValueError(f"{stage}: num_steps={num_steps}: an arm needs at least one step")
    return TrainedArm(best=best[2], best_step=best[1], curve=curve, records=records, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens)


def stage_config(config: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict,
                 num_steps: int) -> ml_collections.ConfigDict:
    """The trainer config of an arm: the run's grpo and rollout sections with `optimizer`, its schedule over
    `num_steps`."""
    stage = train.stage_trainer_config(config, optimizer)
    stage.optimizer.total_steps = num_steps
    return stage


def continued_batch_size(config: ml_collections.ConfigDict, settings: ml_collections.ConfigDict,
                         examples: Sequence[pipeline.PromptExample]) -> int:
    """`settings.continued_sft_batch_size`, or (0) the batch whose prompts and gold targets are about as many
    tokens as a GRPO step's prompts (each once: the G samples share it) and G completions of the targets' mean
    length: ceil(B x (prompt + G x target) / (prompt + target))."""
    if settings.continued_sft_batch_size:
        return settings.continued_sft_batch_size
    prompt = statistics.fmean(len(e.prompt_ids) for e in examples)
    target = statistics.fmean(len(e.target_ids) for e in examples)
    b, g = config.grpo.batch_size, config.grpo.num_generations
    return min(len(examples), math.ceil(b * (prompt + g * target) / (prompt + target)))


def diagnostics(records: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"start", "end"}}: the mean of each `DIAGNOSTICS` metric over the first and the last tenth of
    the steps (at least one step each)."""
    window = max(1, len(records) // 10)
    out = {}
    for name in DIAGNOSTICS:
        values = [r[name] for r in records if name in r]
        if values:
            out[name] = {"start": statistics.fmean(values[:window]), "end": statistics.fmean(values[-window:])}
    return out


def run_variant(data: VariantData, checkpoint: str, variant: str, *, seed: int,
                settings: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """SFT to its plateau, then GRPO (and, for "anchors", continued SFT) from it, each scored on test."""
    config = data.config
    suffix = "" if variant == "anchors" else f"_{variant}"
    sft_examples = [e for e in data.examples["train"] if e.target_ids is not None]

    def validate(model: Any) -> dict[str, float]:
        return evaluate_split(model, data.examples["validation"], data)

    def arm_result(arm: TrainedArm) -> dict[str, Any]:
        return {"test": evaluate_split(arm.best.model(), data.examples["test"], data, timed=True),
                "best_step": arm.best_step, "validation_curve": arm.curve,
                "tokens": {"prompt": arm.prompt_tokens, "completion": arm.completion_tokens,
                           "steps": len(arm.records)}}

    def sft_trainer(model: Any, optimizer: ml_collections.ConfigDict, num_steps: int) -> Trainer:
        return Trainer(model, stage_config(config, optimizer, num_steps), reward_fn=None,
                       stop_tokens=data.stop_tokens, suppress_tokens=data.suppress_tokens)

    say(f"seed {seed} {variant}: SFT to the validation plateau (at most {config.sft.num_steps} steps)")
    model = models.from_pretrained(checkpoint, overrides=flat_config(config.model.overrides.to_dict()))
    trainer = sft_trainer(model, config.sft.optimizer, config.sft.num_steps)
    sft = train_arm(trainer, "sft", pipeline.batches(sft_examples, batch_size=config.sft.batch_size, seed=seed),
                    num_steps=config.sft.num_steps, validate=validate, settings=settings, num_generations=1,
                    early_stop=True)
    results = {f"sft{suffix}": arm_result(sft)}
    num_steps = config.grpo.num_steps

    if variant == "anchors":
        batch_size = continued_batch_size(config, settings, sft_examples)
        say(f"seed {seed}: SFT continued from step {sft.best_step}, {num_steps} steps of {batch_size}")
        trainer = sft_trainer(sft.best.model(), config.optimizer, num_steps)
        continued = train_arm(trainer, "sft", pipeline.batches(sft_examples, batch_size=batch_size, seed=seed + 1),
                              num_steps=num_steps, validate=validate, settings=settings, num_generations=1,
                              early_stop=False)
        results["sft_continued"] = {**arm_result(continued), "batch_size": batch_size}

    say(f"seed {seed} {variant}: GRPO from SFT step {sft.best_step}, {num_steps} steps")
    adapter = RewardAdapter(data.tokenizer, config.inserter, data.stop_tokens)

    def reward_fn(examples: Sequence[Any], completions: Sequence[Sequence[int]]) -> RewardResult:
        scored = adapter(examples, completions)
        return RewardResult(total=scored.total, components=scored.components, counts=scored.counts)

    grpo_config = stage_config(config, config.optimizer, num_steps)
    trainer = Trainer(sft.best.model(), grpo_config, reward_fn=reward_fn, stop_tokens=data.stop_tokens,
                      suppress_tokens=data.suppress_tokens)
    grpo = train_arm(trainer, "grpo", pipeline.batches(data.examples["train"], batch_size=config.grpo.batch_size,
                                                       seed=seed + 1),
                     num_steps=num_steps, validate=validate, settings=settings,
                     num_generations=config.grpo.num_generations, early_stop=False)
    curve = [{name: r[name] for name in ("step", *DIAGNOSTICS) if name in r} for r in grpo.records]
    results[f"grpo{suffix}"] = {**arm_result(grpo), "diagnostics": diagnostics(grpo.records), "training": curve,
                                "sft_validation": sft.curve[[c["step"] for c in sft.curve].index(sft.best_step)]}
    return results


def rule_arm(data: VariantData, encoder: Any) -> dict[str, Any]:
    """The rule baseline: threshold chosen on validation by reward, scored on test."""
    threshold, _ = evaluation.choose_rule_threshold(data.examples["validation"], encoder, data.config.inserter)
    completions = evaluation.rule_completions(data.examples["test"], encoder, threshold=threshold,
                                              inserter=data.config.inserter)
    scores = evaluation.score_completions(completions, data.examples["test"], data.config.inserter)
    scores["decode_tokens"] = 0.0  # no decoding: the rule writes its placements directly
    return {"test": scores, "threshold": threshold}


# ---------------------------------------------------------------------------------------------- report


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of `values`, NaNs left out."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def summarize(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], arms: Sequence[str],
              columns: Mapping[str, str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{arm: {metric: (mean, sd)}} over the seeds that ran the arm (metrics: `columns`' values)."""
    out = {}
    for arm in arms:
        runs = [seed_arms[arm] for seed_arms in per_seed.values() if arm in seed_arms]
        if runs:
            out[arm] = {metric: spread([r["test"][metric] for r in runs]) for metric in columns.values()}
            out[arm]["seeds"] = (float(len(runs)), 0.0)
    return out


def _cell(mean_sd: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    mean, sd = mean_sd
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def markdown_table(summary: Mapping[str, Mapping[str, tuple[float, float]]], columns: Mapping[str, str],
                   extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """A Markdown table: one row per arm; quality metrics x100, tokens and seconds as they are."""
    extra = extra or {}
    extra_columns = list(next(iter(extra.values()))) if extra else []
    lines = ["| arm | " + " | ".join([*columns, *extra_columns]) + " |",
             "|---" * (1 + len(columns) + len(extra_columns)) + "|"]
    for arm, row in summary.items():
        cells = []
        for name, metric in columns.items():
            if metric == "decode_tokens":
                cells.append(_cell(row[metric], 1.0, 1))
            elif metric == "seconds_per_answer":
                cells.append(_cell(row[metric], 1000.0, 2) + " ms")
            else:
                cells.append(_cell(row[metric]))
        cells += [extra.get(arm, {}).get(c, "") for c in extra_columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arm_extras(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
               arms: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per arm: the chosen steps over seeds, tokens seen per step and the training reward's start -> end."""
    out = {}
    for arm in arms:
        runs = [seed_arms[arm] for seed_arms in per_seed.values() if arm in seed_arms]
        if not runs:
            continue
        row = {"steps chosen": ", ".join(str(r["best_step"]) for r in runs) if "best_step" in runs[0] else "",
               "tokens seen / step": "", "train reward": ""}
        if "tokens" in runs[0]:
            per_step = [(r["tokens"]["prompt"] + r["tokens"]["completion"]) / r["tokens"]["steps"] for r in runs]
            row["tokens seen / step"] = f"{statistics.fmean(per_step):.0f}"
        if "diagnostics" in runs[0]:
            start, _ = spread([r["diagnostics"]["reward/mean"]["start"] for r in runs])
            end, _ = spread([r["diagnostics"]["reward/mean"]["end"] for r in runs])
            row["train reward"] = f"{start:.3f} → {end:.3f}"
        out[arm] = row
    return out


def diagnostics_table(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> str:
    """The GRPO arms' training diagnostics (means over seeds), start -> end, with the SFT model's validation
    reward (greedy) beside its sampled training reward at GRPO's start."""
    lines = ["| arm | SFT val. reward (greedy) | " + " | ".join(DIAGNOSTICS) + " |",
             "|---" * (2 + len(DIAGNOSTICS)) + "|"]
    for arm in ("grpo", "grpo_no_captions", "grpo_inline"):
        runs = [seed_arms[arm] for seed_arms in per_seed.values() if arm in seed_arms]
        if not runs:
            continue
        sft_reward = statistics.fmean(r["sft_validation"]["reward"] for r in runs)
        cells = []
        for name in DIAGNOSTICS:
            found = [r["diagnostics"][name] for r in runs if name in r["diagnostics"]]
            cells.append("-" if not found else f"{statistics.fmean(d['start'] for d in found):.3f} → "
                         f"{statistics.fmean(d['end'] for d in found):.3f}")
        lines.append(f"| {arm} | {sft_reward:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summary: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[str, Any]:
    """Whether GRPO beats continued SFT on each of `VERDICT_METRICS`: mean difference larger than the larger of
    the two arms' standard deviations over seeds."""
    out: dict[str, Any] = {}
    if "grpo" not in summary or "sft_continued" not in summary:
        return out
    for metric in VERDICT_METRICS:
        (g, g_sd), (c, c_sd) = summary["grpo"][metric], summary["sft_continued"][metric]
        out[metric] = {"difference": g - c, "spread": max(g_sd, c_sd), "grpo_wins": g - c > max(g_sd, c_sd)}
    out["grpo_beats_continued_sft"] = all(out[m]["grpo_wins"] for m in VERDICT_METRICS)
    return out


def report(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], rule: Mapping[str, Any],
           counts: Mapping[str, int], seconds: float) -> tuple[str, dict[str, Any]]:
    """The tables (Markdown) and the JSON summary of the experiment."""
    with_rule = {seed: {"rule": rule, **arms} for seed, arms in per_seed.items()}
    summary = summarize(with_rule, ARMS, COLUMNS)
    inline_seeds = {seed: arms for seed, arms in per_seed.items() if "sft_inline" in arms}
    formats = summarize(inline_seeds or per_seed, FORMAT_ARMS, FORMAT_COLUMNS)  # both formats on the same seeds
    decided = verdict(summary)
    lines = [f"test split: {counts['test']} questions (validation {counts['validation']}, train "
             f"{counts['train']}); {len(per_seed)} seeds; mean ± sd over seeds, quality x100; "
             f"{seconds / 60:.1f} min in this invocation (arms found done are read from their arms.json)", "",
             markdown_table(summary, COLUMNS, arm_extras(with_rule, ARMS)), "",
             "GRPO training (means over seeds, first tenth → last tenth of the steps):", "",
             diagnostics_table(per_seed), "",
             "Formats (seeds with the inline arms), test split:", "",
             markdown_table(formats, FORMAT_COLUMNS), ""]
    for metric in VERDICT_METRICS:
        if metric in decided:
            d = decided[metric]
            lines.append(f"{metric}: grpo - sft_continued = {d['difference'] * 100:+.1f} (spread "
                         f"{d['spread'] * 100:.1f}): {'GRPO better' if d['grpo_wins'] else 'not better'}")
    if decided:
        lines.append("verdict: GRPO " + ("beats" if decided["grpo_beats_continued_sft"] else "does not beat")
                     + " continued SFT on F1 and placement by more than the spread over seeds")
    payload = {"summary": {arm: {m: list(v) for m, v in row.items()} for arm, row in summary.items()},
               "formats": {arm: {m: list(v) for m, v in row.items()} for arm, row in formats.items()},
               "verdict": decided, "questions": dict(counts), "seeds": len(per_seed), "minutes": seconds / 60}
    return "\n".join(lines), payload


# ------------------------------------------------------------------------------------------------ main


def run_experiment(config: ml_collections.ConfigDict, out: str, num_seeds: int,
                   variants: Sequence[str] = VARIANTS) -> tuple[str, dict[str, Any]]:
    """Trains and scores the arms of `variants` for seeds 0..num_seeds-1 (module docstring); returns the tables
    and the JSON summary, also written to `{out}/table.md` and `{out}/results.json`."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants {sorted(unknown)}: expected some of {VARIANTS}")
    start = time.perf_counter()
    settings = config.learning if "learning" in config else learning_config.get_learning_config()
    train.enable_compilation_cache(config.compilation_cache_dir)
    os.makedirs(out, exist_ok=True)
    config = experiment_data(config, settings, out)
    datasets = sources.load_datasets(config.data, image_dir=os.path.join(out, "images"))
    counts = {split: sum(len(ds.questions_of(split)) for ds in datasets) for split in SPLITS}
    if counts["test"] < settings.min_test_questions:
        raise cli.UserError(
            f"the test split has {counts['test']} questions, fewer than learning.min_test_questions="
            f"{settings.min_test_questions}: raise config.data.split.test or learning.corpus_scale "
            f"(configs/learning.py)")
    say(f"questions: {counts}")
    encoder = sentence_encoder.load_encoder(config.data.retrieval.encoder_path)
    retrievers = pipeline.build_retrievers(datasets, config.data, encoder)

    data: dict[str, VariantData] = {}
    prepared_with: dict[str, str] = {}  # variant -> the checkpoint whose tokenizer its prompts used
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in range(num_seeds):
        per_seed[seed] = {}
        for variant in [v for v in VARIANTS if v in variants and (v != "inline" or seed < settings.format_seeds)]:
            workdir = os.path.join(out, variant, f"seed{seed}")
            done = os.path.join(workdir, "arms.json")
            if os.path.isfile(done):
                with open(done) as f:
                    per_seed[seed].update(json.load(f))
                continue
            os.makedirs(workdir, exist_ok=True)
            run = variant_config(config, variant)
            checkpoint = seed_checkpoint(run, datasets, workdir, seed)
            if variant not in data:
                data[variant] = prepare_variant(run, datasets, retrievers, checkpoint)
                prepared_with[variant] = checkpoint
            same_tokenizer(prepared_with[variant], checkpoint)
            arms = run_variant(data[variant], checkpoint, variant, seed=seed, settings=settings)
            write_json(done, arms)
            per_seed[seed].update(arms)
    rule_path = os.path.join(out, "rule.json")
    if os.path.isfile(rule_path):
        with open(rule_path) as f:
            rule = json.load(f)
    else:
        if "anchors" not in data:
            run = variant_config(config, "anchors")
            checkpoint = seed_checkpoint(run, datasets, os.path.join(out, "anchors", "seed0"), 0)
            data["anchors"] = prepare_variant(run, datasets, retrievers, checkpoint)
        rule = rule_arm(data["anchors"], encoder)
        write_json(rule_path, rule)
    text, payload = report(per_seed, rule, counts, time.perf_counter() - start)
    write_json(os.path.join(out, "results.json"), {**payload, "per_seed": per_seed, "rule": rule})
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    return text, payload


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_OUT)
    text, payload = run_experiment(_CONFIG.value, _OUT.value, _SEEDS.value, _VARIANTS.value)
    print(text)
    print(json.dumps(payload))


if __name__ == "__main__":
    cli.run(main)
