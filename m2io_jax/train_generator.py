"""Trains the demo's answer generators: tiny text Qwen2 models, by SFT on the corpus's question -> answer pairs.

    python -m m2io_jax.train_generator --config=configs/demo_generator.py --workdir=DIR
    python -m m2io_jax.train_generator --config=configs/demo_generator.py --workdir=DIR --config.sft.num_steps=50

So that the demo's answers read like answers (a real deployment points `config.generator.checkpoint` at a local
Qwen2.5-Instruct instead). Settings: `--config` (default `m2io_jax.generator.get_config()`, whose docstring lists
the sections). DIR may be the inserter's training workdir (`python -m m2io_jax.train`), so that `python -m
m2io_jax.answer --workdir=DIR` finds the inserter and the generators together; nothing of that run is
overwritten.

The run: read the datasets (the data section's source and split rule, as `m2io_jax.train` does); load or build
the retrieval index in `DIR/index` (`m2io_jax.retrieval.index_cache`); for each question of the train and
validation splits retrieve its top chunks; build a tiny Qwen2 into `DIR/generator_init` (byte-level BPE
tokenizer trained on the corpus, the prompts and the answers); then for each mode of `config.modes`:
  text  prompt `generator.prompt_messages(question, retrieved passages)`, target the gold answer text;
  llm   prompt with the candidate images listed (`generator.llm_inputs` of the question's candidates, missed gold
        images added for training questions only, as for the inserter), target the gold answer with each gold
        image's `<imgN>` after its anchor sentence (`candidates.render_gold`): MRAMG-Bench's LLM-based method;
SFT (`m2io_jax.rl.trainer.Trainer.sft_step`) from the same initial model, with greedy answers on the validation
split before and after (`Generator.answer`, the path `answer` uses): ROUGE-L against the gold text (image
markers stripped from both), and for llm image F1 and ordering of the placeholders written.

Writes in DIR:
  generator/, generator_llm/   Hugging Face directories with the tokenizer (`Generator.from_pretrained` loads them)
  generator_init/              the untrained tiny model both start from
  generator_config.json        the config of the run
  generator_eval.json          {mode: {"init": {metric: value}, "sft": {...}}}
  generator_metrics.jsonl      one JSON object per SFT step: mode, step and the trainer's metrics
  index/                       the retrieval index (reused by answer / evaluate)
and prints one progress line every `config.print_every` steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags

from m2io_jax import cli, generator, models
from m2io_jax.eval import metrics
from m2io_jax.inserter import candidates as candidates_lib
from m2io_jax.inserter import pipeline, sources
from m2io_jax.models import sentence_encoder, tiny
from m2io_jax.retrieval import index_cache
from m2io_jax.retrieval import retriever as retriever_lib
from m2io_jax.rl.trainer import PromptBatch, Trainer
from m2io_jax.run_log import check_writable
from m2io_jax.train import enable_compilation_cache, run_record, write_json

# allow_override: m2io_jax.train and m2io_jax.export define the same --workdir; the commands may be imported into
# one process (only the running command's flags are parsed)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for the generators (created if missing; may be the "
                               "inserter's training workdir; required)", allow_override=True)
_CONFIG = cli.define_config(generator, "generator training settings (default: m2io_jax.generator.get_config())")

SPLITS = ("train", "validation")
INIT_DIR = "generator_init"


@dataclasses.dataclass(frozen=True)
class Example:
    """One question as the generator sees it in one mode: what `Generator.answer` takes, and the gold text."""

    question: str
    passages: tuple[str, ...]
    images: tuple[tuple[str, str], ...] | None  # llm mode: (id, caption) of each candidate image
    target: str  # the gold answer (llm mode: with `<imgN>` placeholders)
    gold_images: tuple[str, ...]  # llm mode: the gold image ids, in answer order


def build_examples(config: ml_collections.ConfigDict, datasets: Sequence[sources.SplitDataset],
                   retrievers: dict[str, retriever_lib.Retriever]) -> dict[str, dict[str, list[Example]]]:
    """{mode: {split: examples}} for the train and validation splits of every dataset."""
    top_k = config.generator.top_k
    out: dict[str, dict[str, list[Example]]] = {mode: {split: [] for split in SPLITS} for mode in generator.MODES}
    for ds in datasets:
        retriever = retrievers[ds.name]
        for split in SPLITS:
            questions = ds.questions_of(split)
            if not questions:
                continue
            for question, hits in zip(questions, retriever.search([q.question for q in questions], top_k)):
                chunks = [hit.chunk for hit in hits]
                answer = question.answer or question.ground_truth
                out[generator.TEXT][split].append(Example(question.question, tuple(generator.text_passages(chunks)),
                                                          None, answer, ()))
                candidates = candidates_lib.candidates_for_split(
                    question, chunks, ds.images, split=split, settings=config.data.candidates,
                    extra_chunks=retriever_lib.gold_chunks(question, retriever))
                passages, images = generator.llm_inputs(candidates)
                out[generator.LLM][split].append(Example(question.question, tuple(passages), tuple(images),
                                                         candidates_lib.render_gold(question, candidates),
                                                         candidates.gold))
    return out


def tokenizer_texts(datasets: Sequence[sources.SplitDataset], examples: dict[str, dict[str, list[Example]]],
                    ) -> list[str]:
    """The corpus and every training prompt and target of both modes: what the tiny tokenizer is trained on."""
    texts = sources.corpus_texts(datasets)
    for by_split in examples.values():
        for e in by_split["train"]:
            messages = generator.prompt_messages(e.question, e.passages, e.images)
            texts += [m["content"] for m in messages] + [e.target]
    return texts


def tokenize(tokenizer: Any, examples: Sequence[Example], config: ml_collections.ConfigDict,
             stop_token: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + the end-of-turn token) of each example, prompts as `Generator.answer` builds them."""
    out = []
    for e in examples:
        prompt, _ = generator.fit_prompt(tokenizer, e.question, e.passages[:config.generator.top_k], e.images,
                                         config.generator.max_prompt_tokens)
        out.append((prompt, list(tokenizer(e.target, add_special_tokens=False)["input_ids"]) + [stop_token]))
    return out


def evaluate(answerer: generator.Generator, examples: Sequence[Example]) -> dict[str, float]:
    """Greedy answers to `examples`: mean ROUGE-L (image markers stripped) and answer tokens; with images, image
    F1 and ordering of the placeholders written against the gold ones."""
    llm = examples[0].images is not None
    answers = answerer.answer([e.question for e in examples], [list(e.passages) for e in examples],
                              [list(e.images) for e in examples] if llm else None)
    rouge, f1, ordering = [], [], []
    for e, a in zip(examples, answers):
        rouge.append(metrics.rouge_lsum(metrics.strip_image_markers(e.target), metrics.strip_image_markers(a.text)))
        predicted = metrics.image_markers(a.text)
        f1.append(metrics.image_scores(e.gold_images, predicted)[2])
        ordering.append(metrics.ordering_score(e.gold_images, predicted))
    out = {"rouge_l": sum(rouge) / len(rouge), "answer_tokens": sum(a.num_tokens for a in answers) / len(answers),
           "examples": float(len(examples))}
    if llm:
        out.update(image_f1=sum(f1) / len(f1), ordering=sum(ordering) / len(ordering))
    return out


def train_mode(mode: str, config: ml_collections.ConfigDict, init: str, workdir: str,
               examples: dict[str, list[Example]]) -> dict[str, dict[str, float]]:
    """SFT of one generator from the checkpoint `init` on `examples["train"]`, saved to `workdir`; returns its
    validation metrics before ("init") and after ("sft") training."""
    answerer = generator.Generator.from_pretrained(init, config.generator)
    tokenizer = answerer.tokenizer
    validation = examples["validation"][:config.eval.max_examples or None]
    if not validation or not examples["train"]:
        raise cli.UserError(f"{mode} generator: {len(examples['train'])} training and {len(validation)} validation "
                            f"questions; both splits need at least one")
    results = {"init": evaluate(answerer, validation)}
    print(f"{mode} generator, init: " + _line(results["init"]), flush=True)
    train = tokenize(tokenizer, examples["train"], config, answerer.stop_tokens[0])
    print(f"{mode} generator: {len(train)} training examples, prompts up to {max(len(p) for p, _ in train)} tokens, "
          f"targets up to {max(len(t) for _, t in train)}", flush=True)
    sft_config = ml_collections.ConfigDict({"grpo": config.grpo, "optimizer": config.sft.optimizer,
                                            "rollout": config.rollout})
    trainer = Trainer(answerer.model, sft_config, reward_fn=None, stop_tokens=answerer.stop_tokens)
    batches = pipeline.batches(train, batch_size=config.sft.batch_size, seed=config.seed)
    metrics_path = os.path.join(workdir, "generator_metrics.jsonl")
    start = time.perf_counter()
    for step in range(1, config.sft.num_steps + 1):
        batch = next(batches)
        step_metrics = trainer.sft_step(PromptBatch(token_ids=[p for p, _ in batch], images=None,
                                                    examples=list(range(len(batch))), targets=[t for _, t in batch]))
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"mode": mode, "step": step, **step_metrics}) + "\n")
        if step % config.print_every == 0 or step == config.sft.num_steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (config.sft.num_steps - step)
            print(f"[{mode} sft {step}/{config.sft.num_steps}] loss={step_metrics['loss']:.4f} "
                  f"{elapsed / step:.2f} s/step, ETA {int(eta // 60)}:{int(eta % 60):02d}", flush=True)
    model = trainer.model
    target = os.path.join(workdir, generator.CHECKPOINT_DIRS[mode])
    models.save_pretrained(model, target)
    tokenizer.save_pretrained(target)
    results["sft"] = evaluate(generator.Generator(model, tokenizer, config.generator), validation)
    print(f"{mode} generator, after SFT: " + _line(results["sft"]) + f" (saved in {target})", flush=True)
    return results


def _line(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def train_generators(config: ml_collections.ConfigDict, workdir: str, argv: Sequence[str] = ()
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """Runs the training described in the module docstring; returns generator_eval.json's content."""
    unknown = sorted(set(config.modes) - set(generator.MODES))
    if unknown or not config.modes:
        raise cli.UserError(f"config.modes={tuple(config.modes)}: expected one or more of {generator.MODES}")
    check_writable(workdir)
    enable_compilation_cache(config.compilation_cache_dir)
    write_json(os.path.join(workdir, "generator_config.json"), json.loads(config.to_json_best_effort()))
    write_json(os.path.join(workdir, "generator_run.json"), run_record(argv))
    open(os.path.join(workdir, "generator_metrics.jsonl"), "w").close()

    datasets = sources.load_datasets(config.data, image_dir=os.path.join(workdir, "images"))
    encoder = sentence_encoder.load_encoder(config.data.retrieval.encoder_path)
    retrievers = index_cache.load_or_build(index_cache.index_dir(workdir), config.data, encoder, datasets,
                                           log=lambda line: print(line, flush=True))
    examples = build_examples(config, datasets, retrievers)
    init = os.path.join(workdir, INIT_DIR)
    spec = config.model.tiny
    tiny.build_tiny_checkpoint(init, tokenizer_texts(datasets, examples), kind="qwen2", vocab_size=spec.vocab_size,
                               text_shape=spec.text_shape.to_dict(), seed=spec.seed)
    results = {}
    for mode in config.modes:
        results[mode] = train_mode(mode, config, init, workdir, examples[mode])
        write_json(os.path.join(workdir, "generator_eval.json"), results)
    return results


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_WORKDIR)
    train_generators(_CONFIG.value, _WORKDIR.value, sys.argv)


if __name__ == "__main__":
    cli.run(main)
