r"""Evaluates multimodal answers on MRAMG-format data: runs a system over a split or scores a predictions file.

Three modes:

    python -m m2io_jax.evaluate --predictions answers.jsonl --data /path/to/MRAMG [--output scores.json] \
        [--config.strip_image_markers=false] [--config.bertscore.enabled=false]
    python -m m2io_jax.evaluate --workdir=DIR --system=NAME [--dataset=NAME] [--split=test] [--config=CONFIG]
    python -m m2io_jax.evaluate --workdir=DIR --ftii [--system=m2io|m2io-sft] [--split=test] [--config=CONFIG]

`--predictions` scores an existing predictions file (below). `--system` runs one of `m2io_jax.systems`
(m2io, m2io-sft, rule, llm, oracle-text) over a split of every dataset of the run (`--dataset` picks one),
writes its predictions (`--predictions_out`, default `{workdir}/eval/{system}_{split}.jsonl`) and prints the
metric table, then latency per question (p50 / p95) and tokens generated per stage, and for `oracle-text`
(the inserter on the gold text) the inserter's held-out metrics, placement accuracy included, computed as the
trainer's eval.json computes them. `--ftii` runs the FTII-style evaluation (`m2io_jax.inserter.ftii`): the
inserter (of `--system`, default m2io) and the `rule` baseline choose the image after each paragraph of the
split's step-by-step documents. With `config.judge.enabled`, `--system` also prints the LLM-judge table
(`m2io_jax.eval.judge`).

Config: `--config` holds the evaluation settings (default `m2io_jax/eval/config.py`: scoring, judge, ftii). The
run's settings (data, retrieval, candidates, inserter format, decoding) are read from `{workdir}/config.json`,
what the trainer wrote, so a system is evaluated as it was trained; or `--config` is itself a run config (a
file such as configs/tiny.py, with a `data` section), whose evaluation sections, where absent, take the
defaults. The `systems` section (`m2io_jax.systems.get_systems_config`) takes its defaults when absent.

Latency: a system answers `config.systems.batch_size` questions per batch; a question's latency is its batch's
wall time (retrieve + generate + insert) divided by the batch size (its share). The first batch of each dataset
is answered once before the timed run (`--warmup`), so compilation is not counted.

Predictions: one JSON object per line,
    {"id": "<question id>", "dataset": "<name>", "final_output": "text with <img1> ... <imgN>",
     "image_map": {"img1": "<image name>", ...}}
The predicted images are every `<imgN>` of `final_output`, in order, mapped through `image_map`; an `imgN`
missing from the map counts as a wrong image. Gold images and the reference answer are the question's
`images_list` and `ground_truth` read with `m2io_jax.data.mramg.load_dataset`.

Every question of each scored dataset counts: a question without a prediction scores 0 on every metric and is
reported as missing. Columns: Prec., Rec., F1, Ord. (image metrics), R.L. (ROUGE-Lsum), B.S. (BERTScore F1), all
x100; see `m2io_jax.eval.metrics` and `m2io_jax.eval.bertscore` for the definitions.

Our choice (the official behaviour is not published): `<imgN>` markers are stripped from the answer, and the
reference answer is taken without its image markers, before ROUGE-L and BERTScore
(`--config.strip_image_markers=false` compares the raw strings, as the third-party reference code appears to).
The scoring settings are the `--config` (default `m2io_jax/eval/config.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from m2io_jax import cli, systems
from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib
from m2io_jax.data import splits as splits_lib
from m2io_jax.eval import config as eval_config
from m2io_jax.eval import judge as judge_lib
from m2io_jax.eval import metrics
from m2io_jax.eval.predictions import Prediction, PredictionsError, read_predictions, write_predictions
from m2io_jax.inserter import evaluation, formats, ftii, sources
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.example import example_from_question


@dataclasses.dataclass
class DatasetResult:
    """Per-question scores of one dataset and what was missing or unexpected."""

    name: str
    scores: dict[str, metrics.QuestionScores]
    missing: list[str]
    unknown: list[str]


def score_dataset(
    questions: Sequence[mramg.Question],
    predictions: dict[str, Prediction],
    *,
    name: str,
    strip_markers: bool = True,
    encoder: Any = None,
    bertscore_layer: int | None = None,
) -> DatasetResult:
    """Scores the questions of one dataset; `predictions` maps question id -> Prediction.

    `encoder`: a `SentenceEncoder` for BERTScore, or None to skip BERTScore (the B.S. column is then empty).
    """
    answered = [q for q in questions if q.id in predictions]
    references, answers = [], []
    for q in answered:
        text = predictions[q.id].final_output
        references.append(q.answer if strip_markers else q.ground_truth)
        answers.append(metrics.strip_image_markers(text) if strip_markers else text)
    bert_f1: Sequence[float | None] = [None] * len(answered)
    if encoder is not None and answered:
        from m2io_jax.eval import bertscore

        bert_f1 = [float(x) for x in bertscore.bert_score(answers, references, encoder, layer=bertscore_layer)[2]]
    scores = {
        q.id: metrics.score_answer(q.images, predictions[q.id].images(), ref, ans, f1)
        for q, ref, ans, f1 in zip(answered, references, answers, bert_f1)
    }
    missing = [q.id for q in questions if q.id not in predictions]
    zero = metrics.ZERO_SCORES if encoder is not None else dataclasses.replace(metrics.ZERO_SCORES, bert_score=None)
    scores.update({qid: zero for qid in missing})
    scores = {q.id: scores[q.id] for q in questions}  # question order
    known = {q.id for q in questions}
    return DatasetResult(name, scores, missing, sorted(i for i in predictions if i not in known))


def evaluate(
    predictions_path: str,
    data_root: str,
    *,
    datasets: Sequence[str] = (),
    strip_markers: bool = True,
    bertscore: bool = True,
    encoder_path: str = "",
    bertscore_layer: int | None = None,
) -> tuple[dict[str, dict[str, float | None]], list[DatasetResult]]:
    """Scores a predictions file; returns (table, per-dataset results). See the module docstring."""
    predictions = read_predictions(predictions_path)
    names = list(datasets) or sorted(
        {d for d, _ in predictions},
        key=lambda d: (mramg.DATASETS.index(d) if d in mramg.DATASETS else len(mramg.DATASETS), d)
    )
    if not names:
        raise cli.UserError(f"{predictions_path}: no predictions and no --datasets given: nothing to score")
    encoder = None
    if bertscore:
        from m2io_jax.models.sentence_encoder import load_encoder

        encoder = load_encoder(encoder_path)
    results = []
    for name in names:
        dataset = mramg.load_dataset(data_root, name, strict=False, check_images=False)
        by_id = {qid: p for (d, qid), p in predictions.items() if d == name}
        results.append(
            score_dataset(dataset.questions, by_id, name=name, strip_markers=strip_markers, encoder=encoder,
                          bertscore_layer=bertscore_layer)
        )
    table = metrics.aggregate({r.name: list(r.scores.values()) for r in results})
    return table, results


def report(table: dict[str, dict[str, float | None]], results: Sequence[DatasetResult]) -> str:
    """The metric table followed by one line per dataset with question / missing / unknown counts."""
    lines = [metrics.format_table(table), ""]
    for r in results:
        lines.append(
            f"{r.name}: {len(r.scores)} questions, {len(r.scores) - len(r.missing)} answered, "
            f"{len(r.missing)} missing (scored 0), {len(r.unknown)} predictions for unknown question ids"
            + (f" (e.g. {r.unknown[:3]})" if r.unknown else "")
        )
    return "\n".join(lines)


def to_json(table: dict[str, dict[str, float | None]], results: Sequence[DatasetResult],
            settings: dict[str, Any]) -> dict:
    """The JSON written by `--output`: table, counts, settings and per-question scores (in [0, 1])."""
    return {
        "table": table,
        "columns": list(metrics.COLUMNS),
        "settings": settings,
        "datasets": {
            r.name: {
                "questions": len(r.scores),
                "missing": r.missing,
                "unknown_predictions": r.unknown,
                "scores": {qid: dataclasses.asdict(s) for qid, s in r.scores.items()},
            }
            for r in results
        },
    }


def split_config(config: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict,
                                                                         ml_collections.ConfigDict]:
    """(run config, evaluation settings) of `--config` (see the module docstring): a run config given as
    `--config` is used as is; otherwise the run's `{workdir}/config.json`. Absent evaluation sections and an
    absent `systems` section take their defaults; the workdir's demo generators are served with the settings
    they were trained with (`systems.trained_generator_settings`)."""
    settings = eval_config.get_config()
    if "data" in config:
        run = ml_collections.ConfigDict(config.to_dict())
        for key in settings:
            if key in config:
                settings[key] = config[key]
    else:
        settings = config
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise cli.UserError(f"{path}: no run config; train a run there with python -m m2io_jax.train "
                                f"--config=CONFIG --workdir={workdir}, or pass the run's --config file")
        with open(path, encoding="utf-8") as f:
            run = ml_collections.ConfigDict(json.load(f))
    if "systems" not in run:
        run.systems = systems.get_systems_config()
    systems.use_trained_generator_settings(run, workdir)
    return run, settings


def run_datasets(run: ml_collections.ConfigDict, workdir: str, names: Sequence[str]) -> list[sources.SplitDataset]:
    """The run's datasets (`run.data.datasets`), or those of `names` among them."""
    unknown = [name for name in names if name not in run.data.datasets]
    if unknown:
        raise cli.UserError(f"--dataset={','.join(unknown)}: not a dataset of the run; expected one of "
                            f"{list(run.data.datasets)}")
    data = ml_collections.ConfigDict(run.data.to_dict())
    data.datasets = tuple(names) or tuple(run.data.datasets)
    return sources.load_datasets(data, image_dir=os.path.join(workdir, "images"))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else math.nan


def system_costs(answers: Sequence[systems.SystemAnswer]) -> dict[str, float]:
    """Latency per question (its batch's wall seconds / batch size: p50, p95, mean per stage) and mean tokens
    generated per question per stage."""
    shares = [{stage: a.timings.get(stage, 0.0) / a.batch_size for stage in systems.STAGES} for a in answers]
    totals = [math.fsum(share.values()) for share in shares]
    out = {"questions": float(len(answers)), "latency_p50": percentile(totals, 50),
           "latency_p95": percentile(totals, 95)}
    for stage in systems.STAGES:
        out[f"seconds/{stage}"] = math.fsum(s[stage] for s in shares) / len(shares) if shares else math.nan
    for stage in ("generate", "insert"):
        out[f"tokens/{stage}"] = math.fsum(a.tokens.get(stage, 0) for a in answers) / len(answers) if answers \
            else math.nan
    return out


def oracle_scores(questions: Sequence[mramg.Question], answers: Sequence[systems.SystemAnswer],
                  inserter: ml_collections.ConfigDict) -> dict[str, float]:
    """The inserter's held-out metrics of `oracle-text` answers (the gold text with images placed), as the
    trainer's eval.json computes them (`inserter.evaluation`): image metrics on the candidate ids, gold images
    the candidates lack left out; placement accuracy over the gold images with known anchors. The metrics that
    read the raw completion (format_ok, parse_failed, reward) are not in an answer and are left out."""
    sums = dict.fromkeys(("image_precision", "image_recall", "image_f1", "ordering"), 0.0)
    hits = gold_images = 0
    for question, answer in zip(questions, answers):
        tag = {name: image_id for image_id, name in answer.image_map.items()}
        candidates = Candidates(question_id=question.id, dataset=question.dataset, chunks=(), contexts=(),
                                image_map=dict(answer.image_map), captions=(),
                                gold=tuple(tag[name] for name in question.images if name in tag), gold_missing=(),
                                added_gold=())
        example = example_from_question(question, candidates)
        marked = sentences_lib.locate_markers(answer.text, sentences_lib.IMG_RE)
        placements = [formats.Placement(m[1:-1], index) for m, index in zip(marked.markers, marked.follows)]
        predicted = [p.image for p in placements]
        precision, recall, f1 = metrics.image_scores(example.gold, predicted)
        sums["image_precision"] += precision
        sums["image_recall"] += recall
        sums["image_f1"] += f1
        sums["ordering"] += metrics.ordering_score(example.gold, predicted)
        if example.gold_anchors is not None:
            hits += evaluation.placement_hits(placements, example.gold_anchors, inserter.rewards.placement_tolerance)
            gold_images += len(example.gold_anchors)
    n = len(questions)
    out = {name: value / n for name, value in sums.items()} if n else dict.fromkeys(sums, math.nan)
    out["placement_accuracy"] = hits / gold_images if gold_images else math.nan
    out["placement_gold_images"] = float(gold_images)
    out["examples"] = float(n)
    return out


def judge_scores(judge: judge_lib.Judge, dataset: sources.SplitDataset, questions: Sequence[mramg.Question],
                 answers: Sequence[systems.SystemAnswer]) -> dict[str, float | int | None]:
    """The LLM-judge table row of a dataset's answers."""
    contexts = judge_lib.image_contexts(dataset.documents)
    captions = {name: info.caption for name, info in dataset.images.items()}
    items = [judge_lib.judge_item(q.id, q.question, a.text, a.prediction(dataset.name).images(), captions, contexts)
             for q, a in zip(questions, answers)]
    return judge_lib.aggregate(judge.score(items))


@dataclasses.dataclass
class SystemRun:
    """What `run_system` measured: the metric table, per-dataset results, costs, oracle and judge rows."""

    table: dict[str, dict[str, float | None]]
    results: list[DatasetResult]
    costs: dict[str, dict[str, float]]
    oracle: dict[str, dict[str, float]]
    judge: dict[str, dict[str, float | int | None]]
    predictions_path: str


def run_system(name: str, run: ml_collections.ConfigDict, settings: ml_collections.ConfigDict, workdir: str, *,
               datasets: Sequence[sources.SplitDataset], split: str, predictions_path: str,
               warmup: bool = True) -> SystemRun:
    """Runs system `name` over `split` of each dataset, writes its predictions and scores them."""
    from m2io_jax.models.sentence_encoder import load_encoder

    encoder = load_encoder(run.data.retrieval.encoder_path)
    bert_encoder = load_encoder(settings.bertscore.encoder_path) if settings.bertscore.enabled else None
    judge = judge_lib.Judge.from_pretrained(settings.judge.checkpoint, settings.judge) \
        if settings.judge.enabled else None
    predictions, results, costs, oracle, judged = [], [], {}, {}, {}
    all_questions, all_answers = [], []
    for dataset in datasets:
        questions = dataset.questions_of(split)
        if not questions:
            raise cli.UserError(f"dataset {dataset.name} has no question in split {split!r}")
        system = systems.build_system(name, run, workdir, dataset=dataset, encoder=encoder)
        if warmup:
            system.answer(questions[:run.systems.batch_size])
        answers = system.answer(questions)
        by_id = {a.question_id: a.prediction(dataset.name) for a in answers}
        predictions += by_id.values()
        results.append(score_dataset(questions, by_id, name=dataset.name, strip_markers=settings.strip_image_markers,
                                     encoder=bert_encoder, bertscore_layer=settings.bertscore.layer))
        costs[dataset.name] = system_costs(answers)
        if name == "oracle-text":
            oracle[dataset.name] = oracle_scores(questions, answers, run.inserter)
        if judge is not None:
            judged[dataset.name] = judge_scores(judge, dataset, questions, answers)
        all_questions += questions
        all_answers += answers
    if len(datasets) > 1:
        costs[metrics.AVERAGE_ROW] = system_costs(all_answers)
        if oracle:
            oracle["all"] = oracle_scores(all_questions, all_answers, run.inserter)
    write_predictions(predictions_path, predictions)
    table = metrics.aggregate({r.name: list(r.scores.values()) for r in results})
    return SystemRun(table, results, costs, oracle, judged, predictions_path)


def format_rows(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *, first: str = "Dataset") -> str:
    """A fixed-width table of `rows` ({row name: {column: value}}), floats with 3 significant decimals."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"

    width = max([len(first)] + [len(name) for name in rows])
    widths = [max(len(c), 8) for c in columns]
    lines = [f"{first:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell(row.get(c)):>{w}}" for c, w in zip(columns, widths)))
    return "\n".join(lines)


COST_COLUMNS = ("questions", "latency_p50", "latency_p95", "seconds/retrieve", "seconds/generate", "seconds/insert",
                "tokens/generate", "tokens/insert")
ORACLE_COLUMNS = ("image_precision", "image_recall", "image_f1", "ordering", "placement_accuracy",
                  "placement_gold_images", "examples")


def system_report(name: str, split: str, outcome: SystemRun) -> str:
    """The metric table, the cost table and, where measured, the oracle and judge tables."""
    parts = [f"system {name}, split {split}: predictions in {outcome.predictions_path}", "",
             report(outcome.table, outcome.results), "",
             "latency per question in seconds (batch wall time / batch size) and tokens generated per question:",
             format_rows(outcome.costs, COST_COLUMNS)]
    if outcome.oracle:
        parts += ["", "inserter on the gold text (as eval.json):", format_rows(outcome.oracle, ORACLE_COLUMNS)]
    if outcome.judge:
        columns = (*judge_lib.RUBRICS, "questions", "no_image", *(f"unparsable/{r}" for r in judge_lib.RUBRICS))
        parts += ["", "LLM judge (x100):", format_rows(outcome.judge, columns)]
    return "\n".join(parts)


def run_ftii(run: ml_collections.ConfigDict, settings: ml_collections.ConfigDict, workdir: str, *,
             datasets: Sequence[sources.SplitDataset], split: str, system: str) -> dict[str, dict[str, dict]]:
    """FTII accuracy of the inserter of `system` (m2io: `final/`, m2io-sft: `sft/`) and of the rule baseline on
    the step-by-step datasets among `datasets`: {dataset: {"inserter": METRICS, "rule": METRICS}}."""
    from m2io_jax.models.sentence_encoder import load_encoder

    if system not in ("m2io", "m2io-sft"):
        raise cli.UserError(f"--ftii --system={system}: expected m2io or m2io-sft (the inserter to evaluate)")
    chosen = [d for d in datasets if d.name in settings.ftii.datasets]
    if not chosen:
        raise cli.UserError(f"--ftii: none of the datasets {[d.name for d in datasets]} is in config.ftii.datasets="
                            f"{list(settings.ftii.datasets)} (the step-by-step ones)")
    section = run.systems
    checkpoint = systems.inserter_checkpoint(
        section.inserter_checkpoint if system == "m2io" else section.sft_checkpoint, workdir,
        "final" if system == "m2io" else "sft")
    decode = ml_collections.ConfigDict(run.to_dict())
    decode.eval.batch_size = settings.ftii.batch_size
    decode.eval.max_new_tokens = settings.ftii.max_new_tokens
    inserter = systems.ModelInserter(checkpoint, decode, retrieval=None)
    encoder = load_encoder(run.data.retrieval.encoder_path)
    threshold = ftii_rule_threshold(run, workdir)
    out = {}
    for dataset in chosen:
        problems, prompts = ftii.fit_prompts(dataset, split, settings.ftii, run.inserter.shuffle_seed,
                                             processor=inserter.processor, inserter=run.inserter,
                                             max_prompt_tokens=run.pipeline.max_prompt_tokens)
        if not problems:
            raise cli.UserError(f"dataset {dataset.name}: no document of split {split!r} has an image")
        placed = [None if result is None else ftii.placements_of(result[0]) for result in inserter(prompts)]
        rule = [ftii.rule_placements(p, encoder, threshold) for p in problems]
        out[dataset.name] = {"inserter": ftii.score(problems, placed), "rule": ftii.score(problems, rule),
                             "rule_threshold": threshold}
    return out


def ftii_rule_threshold(run: ml_collections.ConfigDict, workdir: str) -> float:
    """The rule baseline's threshold: the run's eval.json "rule" entry (chosen on validation), else
    `config.inserter.rule.threshold`."""
    path = os.path.join(workdir, "eval.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rule = json.load(f).get("rule") or {}
        if "threshold" in rule:
            return float(rule["threshold"])
    return float(run.inserter.rule.threshold)


def ftii_report(results: Mapping[str, Mapping[str, Any]], system: str, split: str) -> str:
    rows = {f"{name} {who}": results[name][key] for name in results
            for who, key in ((system, "inserter"), ("rule", "rule"))}
    return f"FTII-style evaluation, split {split} (image after each paragraph):\n" + format_rows(
        rows, ftii.METRICS, first="Dataset / system")


# allow_override: other commands (train, export, answer, retrieval.recall, retrieval.build_index) define flags
# of the same names, and tests import several commands into one process.
_PREDICTIONS = flags.DEFINE_string("predictions", None, "score this predictions jsonl (one answer per line; see "
                                   "module doc)")
_DATA = flags.DEFINE_string("data", None, "MRAMG-format data directory (doc_*.jsonl, *_mqa.jsonl, images_info/), "
                            "with --predictions")
_DATASETS = flags.DEFINE_list("datasets", [], "with --predictions: datasets to score (default: every dataset named "
                              "in the predictions)")
_DATASET = flags.DEFINE_string("dataset", None, "with --system / --ftii: run only this dataset of the run (default: "
                               "each of its config.data.datasets)", allow_override=True)
_OUTPUT = flags.DEFINE_string("output", "", "write the tables, counts and per-question scores to this JSON file",
                              allow_override=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory (final/, sft/, generator/, eval.json, "
                               "config.json), with --system or --ftii", allow_override=True)
_SYSTEM = flags.DEFINE_string("system", None, f"run this system over the split: one of {systems.SYSTEM_NAMES} "
                              f"(with --ftii: the inserter, m2io or m2io-sft; default m2io)", allow_override=True)
_SPLIT = flags.DEFINE_enum("split", "test", list(splits_lib.SPLITS), "the split to run a system on",
                           allow_override=True)
_FTII = flags.DEFINE_bool("ftii", False, "FTII-style evaluation: the image after each paragraph of the split's "
                          "step-by-step documents, the inserter against the rule baseline")
_PREDICTIONS_OUT = flags.DEFINE_string("predictions_out", "", "where --system writes its predictions (default "
                                       "{workdir}/eval/{system}_{split}.jsonl)")
_WARMUP = flags.DEFINE_bool("warmup", True, "answer each dataset's first batch once before timing (compiles)")
_CONFIG = cli.define_config(eval_config, "evaluation settings (scoring, judge, ftii), or a run config")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_output(value: Any) -> None:
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
        print(f"wrote {_OUTPUT.value}")


def score_file(config: ml_collections.ConfigDict) -> None:
    """The `--predictions` mode."""
    cli.require(_DATA)
    bertscore = config.bertscore
    settings = {
        "predictions": os.path.abspath(_PREDICTIONS.value),
        "data": os.path.abspath(_DATA.value),
        "strip_image_markers": config.strip_image_markers,
        "bertscore": bertscore.enabled,
        "encoder": bertscore.encoder_path or ("default MiniLM" if bertscore.enabled else ""),
        "bertscore_layer": bertscore.layer,
    }
    try:
        table, results = evaluate(
            _PREDICTIONS.value, _DATA.value, datasets=_DATASETS.value, strip_markers=config.strip_image_markers,
            bertscore=bertscore.enabled, encoder_path=bertscore.encoder_path, bertscore_layer=bertscore.layer,
        )
    except PredictionsError as error:
        raise cli.UserError(str(error)) from error
    print(report(table, results))
    _write_output(to_json(table, results, settings))


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    if _PREDICTIONS.value is not None:
        if _SYSTEM.value is not None or _FTII.value:
            raise cli.UserError("--predictions scores a file; --system / --ftii run a system: give one of them")
        score_file(_CONFIG.value)
        return
    if _SYSTEM.value is None and not _FTII.value:
        raise cli.UserError("nothing to do: give --predictions FILE --data DIR (score a file), --system NAME "
                            "(run a system) or --ftii")
    cli.require(_WORKDIR)
    workdir = _WORKDIR.value
    run, settings = split_config(_CONFIG.value, workdir)
    datasets = run_datasets(run, workdir, [_DATASET.value] if _DATASET.value else [])
    if _FTII.value:
        system = _SYSTEM.value or "m2io"
        results = run_ftii(run, settings, workdir, datasets=datasets, split=_SPLIT.value, system=system)
        print(ftii_report(results, system, _SPLIT.value))
        _write_output({"ftii": {name: {k: ({m: _finite(v) for m, v in r.items()} if isinstance(r, dict) else r)
                                       for k, r in row.items()} for name, row in results.items()}})
        return
    if _SYSTEM.value not in systems.SYSTEM_NAMES:
        raise cli.UserError(f"--system={_SYSTEM.value}: expected one of {systems.SYSTEM_NAMES}")
    path = _PREDICTIONS_OUT.value or os.path.join(workdir, "eval", f"{_SYSTEM.value}_{_SPLIT.value}.jsonl")
    outcome = run_system(_SYSTEM.value, run, settings, workdir, datasets=datasets, split=_SPLIT.value,
                         predictions_path=path, warmup=_WARMUP.value)
    print(system_report(_SYSTEM.value, _SPLIT.value, outcome))
    value = to_json(outcome.table, outcome.results, {"system": _SYSTEM.value, "split": _SPLIT.value,
                                                     "workdir": os.path.abspath(workdir)})
    value.update(costs=outcome.costs, oracle={k: {m: _finite(v) for m, v in row.items()}
                                              for k, row in outcome.oracle.items()}, judge=outcome.judge)
    _write_output(value)


if __name__ == "__main__":
    cli.run(main)
