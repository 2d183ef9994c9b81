r"""Every system on one split with the same retrieval, in one table: what the README's systems table prints.

    python -m m2io_jax.experiments.systems --workdir=DIR [--inline_workdir=DIR2] [--split=test] \
        [--config.bertscore.enabled=false]

DIR is a training run's workdir (`python -m m2io_jax.train`, anchors or inline format) that also holds the demo
generators (`python -m m2io_jax.train_generator --workdir=DIR`: generator/, generator_llm/). Each system of
`m2io_jax.systems` (m2io, m2io-sft, rule, llm, oracle-text) is run over the split of every dataset of the run by
`m2io_jax.evaluate.run_system`, exactly as `python -m m2io_jax.evaluate --system=NAME` runs it (same retrieval,
candidates, greedy decoding, one warm-up batch per dataset before timing), and the command prints:

  1. systems: Prec., Rec., F1, Ord., R.L., B.S. (the MRAMG table's Average row over the datasets, x100),
     placement accuracy (oracle-text: the gold text, so placement is defined), latency per question p50 / p95
     (its batch's wall seconds / batch size, all datasets pooled) and tokens decoded per answer by the generator
     and by the inserter;
  2. formats (with --inline_workdir, a run trained with `--config.inserter.output_format=inline`): m2io and
     oracle-text of both runs: quality, inserter tokens and inserter seconds per question. The inline run's m2io
     uses DIR's generator with DIR's generator settings, so both formats place images in the same text;
  3. FTII (`evaluate.run_ftii`): accuracy and precision of the m2io and m2io-sft inserters and of the rule
     baseline per step-by-step dataset, and pooled over them (weighted by slots / placed images);

and, as its last line, one JSON object holding every figure.

Settings: `--config` is the evaluation settings (default `m2io_jax/eval/config.py`: scoring, ftii); each run's own
settings come from its `config.json` (`evaluate.split_config`). The demo generators are served with the settings
they were trained with: when a run's generator checkpoints are the workdir's own (`systems.generator.checkpoint`
and `llm_checkpoint` empty) and `{workdir}/generator_config.json` exists (what `train_generator` wrote), its
`generator` section (prompt budget, passages, answer length, buckets) replaces `systems.generator`; the command
prints the fields that changed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from m2io_jax import cli, evaluate, generator
from m2io_jax import systems as systems_lib
from m2io_jax.data import splits as splits_lib
from m2io_jax.eval import config as eval_config
from m2io_jax.eval import metrics
from m2io_jax.train import enable_compilation_cache

FORMAT_SYSTEMS = ("m2io", "oracle-text")
"""The systems run in both output formats: end to end, and on the gold text."""
FTII_SYSTEMS = ("m2io", "m2io-sft")
"""The inserters the FTII evaluation scores against the rule baseline."""
PLACEMENT = "Place."
P50, P95 = "p50 s", "p95 s"
GENERATE_TOKENS, INSERT_TOKENS = "gen tok", "ins tok"
INSERT_SECONDS = "ins s"
SYSTEM_COLUMNS = (*metrics.COLUMNS, PLACEMENT, P50, P95, GENERATE_TOKENS, INSERT_TOKENS)
FORMAT_COLUMNS = ("F1", "Ord.", "R.L.", PLACEMENT, INSERT_TOKENS, INSERT_SECONDS, P50)
FTII_COLUMNS = ("accuracy", "precision", "slots", "placed")


def share_generators(inline: ml_collections.ConfigDict, anchors: ml_collections.ConfigDict, workdir: str) -> None:
    """Gives the inline run the anchors run's generators and generator settings (checkpoints resolved to
    `workdir`'s), so that both formats place images in the same text."""
    section = ml_collections.ConfigDict(anchors.systems.generator.to_dict())
    section.checkpoint = generator.checkpoint_path(anchors.systems.generator, workdir, generator.TEXT)
    section.llm_checkpoint = generator.checkpoint_path(anchors.systems.generator, workdir, generator.LLM)
    inline.systems.generator = section


def _pooled(rows: Mapping[str, Any], key: str) -> Any:
    """The `Average` row of an evaluate table (several datasets) or its only row (one dataset)."""
    if metrics.AVERAGE_ROW in rows:
        return rows[metrics.AVERAGE_ROW]
    if key in rows:
        return rows[key]
    (only,) = rows.values()
    return only


def system_row(outcome: evaluate.SystemRun) -> dict[str, float | None]:
    """One system's figures: the MRAMG columns of the datasets' Average row, placement accuracy (oracle-text),
    latency p50 / p95 and mean seconds per stage of every question pooled, tokens per answer per stage."""
    table = _pooled(outcome.table, metrics.AVERAGE_ROW)
    costs = _pooled(outcome.costs, metrics.AVERAGE_ROW)
    oracle = _pooled(outcome.oracle, "all") if outcome.oracle else {}
    row: dict[str, float | None] = {column: table[column] for column in metrics.COLUMNS}
    row[PLACEMENT] = oracle.get("placement_accuracy")
    row[P50], row[P95] = costs["latency_p50"], costs["latency_p95"]
    row[GENERATE_TOKENS], row[INSERT_TOKENS] = costs["tokens/generate"], costs["tokens/insert"]
    row[INSERT_SECONDS] = costs["seconds/insert"]
    row["questions"] = costs["questions"]
    return row


def ftii_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """FTII rows from {inserter system: `evaluate.run_ftii`'s result}: "{dataset} {who}" per dataset (each inserter,
    then the rule baseline) and "all {who}" pooled over the datasets (hits / slots, hits / placed)."""
    whos = [*results, "rule"]
    datasets = list(next(iter(results.values()))) if results else []
    scores = {who: {dataset: results[who][dataset]["inserter"] for dataset in datasets} for who in results}
    scores["rule"] = {dataset: next(iter(results.values()))[dataset]["rule"] for dataset in datasets}
    rows = {f"{dataset} {who}": dict(scores[who][dataset]) for dataset in datasets for who in whos}
    for who in whos:
        slots = math.fsum(s["slots"] for s in scores[who].values())
        placed = math.fsum(s["placed"] for s in scores[who].values())
        hits = math.fsum(s["accuracy"] * s["slots"] for s in scores[who].values() if s["slots"])
        rows[f"all {who}"] = {"accuracy": hits / slots if slots else math.nan,
                              "precision": hits / placed if placed else math.nan, "slots": slots, "placed": placed}
    return rows


def run_all(run: ml_collections.ConfigDict, settings: ml_collections.ConfigDict, workdir: str, *,
            names: Sequence[str], split: str, tag: str) -> dict[str, dict[str, float | None]]:
    """`system_row` of each system of `names` over `split` of the run's datasets; predictions in
    `{workdir}/eval/{name}_{split}.jsonl` as `evaluate --system` writes them."""
    datasets = evaluate.run_datasets(run, workdir, [])
    rows = {}
    for name in names:
        begin = time.perf_counter()
        outcome = evaluate.run_system(name, run, settings, workdir, datasets=datasets, split=split,
                                      predictions_path=os.path.join(workdir, "eval", f"{name}_{split}.jsonl"))
        rows[name] = system_row(outcome)
        print(f"{tag} {name}: done in {time.perf_counter() - begin:.0f} s", flush=True)
    return rows


def report(systems: Mapping[str, Mapping[str, Any]], formats: Mapping[str, Mapping[str, Any]],
           ftii: Mapping[str, Mapping[str, Any]], split: str) -> str:
    """The three tables (module docstring) as text."""
    parts = [f"systems, split {split} (MRAMG columns x100, Average over datasets; {PLACEMENT} placement accuracy "
             f"on the gold text; latency per question in seconds; tokens decoded per answer):",
             evaluate.format_rows(systems, SYSTEM_COLUMNS, first="system")]
    if formats:
        parts += ["", f"output formats, split {split} ({INSERT_SECONDS}: inserter seconds per question):",
                  evaluate.format_rows(formats, FORMAT_COLUMNS, first="system / format")]
    parts += ["", f"FTII, split {split} (image after each paragraph; all: pooled over the datasets):",
              evaluate.format_rows(ftii, FTII_COLUMNS, first="dataset / system")]
    return "\n".join(parts)


def json_ready(value: Any) -> Any:
    """`value` with NaN floats as None (JSON has no NaN) and tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def load_run(settings: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The run config of `workdir` (its config.json, or `settings` when it is a run config), the demo generators'
    trained settings applied (`evaluate.split_config`)."""
    return evaluate.split_config(settings, workdir)[0]


_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory with the demo generators (final/, sft/, "
                               "generator/, generator_llm/, eval.json, config.json); required", allow_override=True)
_INLINE_WORKDIR = flags.DEFINE_string("inline_workdir", None, "a second run, trained with "
                                      "--config.inserter.output_format=inline: m2io and oracle-text in both formats")
_SPLIT = flags.DEFINE_enum("split", "test", list(splits_lib.SPLITS), "the split every system answers",
                           allow_override=True)
_CONFIG = cli.define_config(eval_config, "evaluation settings (scoring, ftii); each run's own settings come from its "
                            "config.json")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_WORKDIR)
    begin = time.perf_counter()
    settings = _CONFIG.value
    if "data" in settings:
        raise cli.UserError("--config: expected evaluation settings (m2io_jax/eval/config.py); each run's settings "
                            "are read from its config.json")
    workdir, split = _WORKDIR.value, _SPLIT.value
    anchors = load_run(settings, workdir)
    enable_compilation_cache(anchors.get("compilation_cache_dir", ""))
    inline = None
    if _INLINE_WORKDIR.value is not None:
        inline = load_run(settings, _INLINE_WORKDIR.value)
        formats_seen = (anchors.inserter.output_format, inline.inserter.output_format)
        if formats_seen[0] == formats_seen[1]:
            raise cli.UserError(f"--workdir and --inline_workdir are both {formats_seen[0]} runs; expected one "
                                f"trained with --config.inserter.output_format=inline and one with anchors")
        share_generators(inline, anchors, workdir)

    systems = run_all(anchors, settings, workdir, names=systems_lib.SYSTEM_NAMES, split=split,
                      tag=anchors.inserter.output_format)
    formats: dict[str, dict[str, float | None]] = {}
    if inline is not None:
        others = run_all(inline, settings, _INLINE_WORKDIR.value, names=FORMAT_SYSTEMS, split=split,
                         tag=inline.inserter.output_format)
        for name in FORMAT_SYSTEMS:
            formats[f"{name} {anchors.inserter.output_format}"] = systems[name]
            formats[f"{name} {inline.inserter.output_format}"] = others[name]
    datasets = evaluate.run_datasets(anchors, workdir, [])
    ftii = ftii_rows({name: evaluate.run_ftii(anchors, settings, workdir, datasets=datasets, split=split,
                                              system=name) for name in FTII_SYSTEMS})
    seconds = time.perf_counter() - begin
    print(report(systems, formats, ftii, split))
    print(f"wall time {seconds:.0f} s")
    print(json.dumps(json_ready({
        "split": split, "workdir": os.path.abspath(workdir),
        "inline_workdir": None if inline is None else os.path.abspath(_INLINE_WORKDIR.value),
        "bertscore": bool(settings.bertscore.enabled), "systems": systems, "formats": formats, "ftii": ftii,
        "seconds": seconds})))


if __name__ == "__main__":
    cli.run(main)
