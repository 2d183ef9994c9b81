"""Answers questions over a corpus with text and images: retrieve, generate, insert, then write the pages.

    python -m m2io_jax.answer --config=configs/tiny.py --workdir=/tmp/tiny_run --question "How do I clean the kettle?"
    python -m m2io_jax.answer --config=configs/tiny.py --workdir=/tmp/tiny_run --questions=questions.txt \
        --out=answers.md --html=answers.html
    python -m m2io_jax.answer --config=configs/tiny.py --workdir=/tmp/tiny_run --question "..." --system=rule \
        --dataset=demo_recipe

DIR (`--workdir`) is a training run's directory: the inserter from `python -m m2io_jax.train` (final/, sft/), the
generators from `python -m m2io_jax.train_generator` (generator/, generator_llm/) and the retrieval index
(index/, built there on first use). `--config` is the run's config (default: `m2io_jax/train_config.py`); its
`systems` section (`systems.get_systems_config()`: other inserter and generator checkpoints, batch size) takes
its defaults when the config has none.
`--system` picks one of `systems.SYSTEM_NAMES` (default m2io); `--dataset` the corpus (default: the config's first
dataset).

Questions: `--question` (one) and / or `--questions=FILE`. FILE ending in `.jsonl` holds one JSON object per line,
`{"question": "..."}`, optionally with `"id"` (an id of a question of the dataset takes that question, gold answer
included, which `--system=oracle-text` needs); any other FILE holds one question per line (blank lines skipped).
All questions go through the stages in batches of `config.systems.batch_size`.

Writes `--out` (Markdown, image links relative to its folder) and `--html` (one self-contained page, images
embedded), and prints where the time went: loading, then each stage (retrieve, generate, insert) summed over the
batches, and the tokens generated per stage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import flags

from m2io_jax import cli, render, systems, train_config
from m2io_jax.data import mramg
from m2io_jax.inserter import sources
from m2io_jax.train import enable_compilation_cache

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory (inserter, generators, index; "
                               "required)", allow_override=True)
_QUESTION = flags.DEFINE_string("question", None, "a question to answer")
_QUESTIONS = flags.DEFINE_string("questions", None, "a file of questions: .jsonl ({\"question\": ..., \"id\": ...} "
                                 "per line) or plain text (one question per line)")
_OUT = flags.DEFINE_string("out", "answer.md", "the Markdown file to write", allow_override=True)
_HTML = flags.DEFINE_string("html", "answer.html", "the self-contained HTML page to write")
_SYSTEM = flags.DEFINE_enum("system", "m2io", systems.SYSTEM_NAMES, "which system answers", allow_override=True)
_DATASET = flags.DEFINE_string("dataset", None, "the dataset whose corpus is searched (default: the config's "
                               "first of data.datasets)", allow_override=True)
_CONFIG = cli.define_config(train_config, "the run's settings, optionally with a systems section "
                            "(default: m2io_jax/train_config.py)")


def read_questions(question: str | None, path: str | None) -> list[dict[str, str]]:
    """The questions of `--question` then `--questions`, each {"question": text} with "id" when the file gives one.

    Raises:
      cli.UserError: no question at all, an empty question, or a malformed JSONL line (naming file:line).
    """
    found: list[tuple[str, dict[str, str]]] = []  # (where it came from, the question)
    if question is not None:
        found.append(("--question", {"question": question}))
    if path is not None:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
        for number, line in lines:
            where = f"{path}:{number}"
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                found.append((where, {"question": line.strip()}))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise cli.UserError(f"{where}: invalid JSON ({error.msg}); expected "
                                    f"{{\"question\": \"...\"}}") from error
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise cli.UserError(f"{where}: expected an object with a \"question\" string")
            found.append((where, {"question": record["question"],
                                  **({"id": str(record["id"])} if "id" in record else {})}))
    if not found:
        raise cli.UserError("no question: give --question \"...\" or --questions=FILE")
    for where, item in found:
        if not item["question"].strip():
            raise cli.UserError(f"{where}: the question is empty; expected the text of a question")
    return [item for _, item in found]


def as_questions(items: Sequence[dict[str, str]], dataset: sources.SplitDataset,
                 system: str) -> list[mramg.Question]:
    """`mramg.Question`s: the dataset's own for ids it holds, else new ones (id `q{n}`, no gold answer)."""
    known = {q.id: q for q in dataset.questions}
    out = []
    for n, item in enumerate(items, 1):
        if item.get("id") in known:
            out.append(known[item["id"]])
            continue
        if system == "oracle-text":
            raise cli.UserError(f"question {n} ({item['question'][:60]!r}) is not a question of dataset "
                                f"{dataset.name}: --system=oracle-text inserts into the gold answer, so every question "
                                f"needs the \"id\" of one (--questions=FILE.jsonl)")
        out.append(mramg.Question(id=item.get("id", f"q{n}"), question=item["question"].strip(), provenance=(),
                                  ground_truth="", images=(), dataset=dataset.name))
    return out


def stage_totals(answers: Sequence[systems.SystemAnswer]) -> tuple[dict[str, float], dict[str, int], int]:
    """Seconds per stage summed over the batches, tokens per stage summed over the answers, and the batch count."""
    seconds = dict.fromkeys(systems.STAGES, 0.0)
    tokens: dict[str, int] = {}
    batches = 0
    i = 0
    while i < len(answers):  # the answers of one batch are adjacent and share its timings
        for stage in systems.STAGES:
            seconds[stage] += answers[i].timings.get(stage, 0.0)
        batches += 1
        i += answers[i].batch_size
    for answer in answers:
        for stage, count in answer.tokens.items():
            tokens[stage] = tokens.get(stage, 0) + count
    return seconds, tokens, batches


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_WORKDIR)
    config = _CONFIG.value
    items = read_questions(_QUESTION.value, _QUESTIONS.value)
    workdir = _WORKDIR.value
    if not os.path.isdir(workdir):
        raise cli.UserError(f"--workdir={workdir}: no such directory; train a run first with "
                            f"python -m m2io_jax.train --config=CONFIG --workdir={workdir}")
    name = _DATASET.value or config.data.datasets[0]
    if name not in config.data.datasets:
        raise cli.UserError(f"--dataset={name}: expected one of config.data.datasets {tuple(config.data.datasets)}")
    enable_compilation_cache(config.get("compilation_cache_dir", ""))
    if "systems" in config:
        systems.use_trained_generator_settings(config, workdir)

    start = time.perf_counter()
    data = config.data.copy_and_resolve_references()
    data.datasets = (name,)
    (dataset,) = sources.load_datasets(data, image_dir=os.path.join(workdir, "images"))
    questions = as_questions(items, dataset, _SYSTEM.value)
    system = systems.build_system(_SYSTEM.value, config, workdir, dataset=dataset)
    loaded = time.perf_counter() - start
    answers = system.answer(questions)

    pages = [render.RenderedAnswer(q.question, a.text, a.image_map) for q, a in zip(questions, answers)]
    out_dir = os.path.dirname(os.path.abspath(_OUT.value))
    os.makedirs(out_dir, exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
        f.write(render.markdown(pages, dataset.images, relative_to=out_dir))
    os.makedirs(os.path.dirname(os.path.abspath(_HTML.value)), exist_ok=True)
    with open(_HTML.value, "w", encoding="utf-8") as f:
        f.write(render.html_page(pages, dataset.images, title=f"{_SYSTEM.value} answers"))

    seconds, tokens, batches = stage_totals(answers)
    shown = sum(len(render.shown_images(page, dataset.images)) for page in pages)
    print(f"{len(answers)} questions in {batches} batches, system {_SYSTEM.value}, dataset {name}: load "
          f"{loaded:.2f} s, " + ", ".join(f"{stage} {seconds[stage]:.2f} s" for stage in systems.STAGES)
          + "; tokens generated: " + ", ".join(f"{stage} {count}" for stage, count in tokens.items()), flush=True)
    print(f"{shown} images placed; wrote {_OUT.value} and {_HTML.value}", flush=True)


if __name__ == "__main__":
    cli.run(main)
