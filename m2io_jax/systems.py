"""The end-to-end systems that answer questions with images, built by name for `answer` and `evaluate --system`.

Every system retrieves the same way (the dataset's retriever: encoder + ScaNN, top `data.retrieval.top_k`
chunks), numbers the images of the retrieved chunks as candidates (`inserter.candidates`, shuffled with
`inserter.shuffle_seed`, as in training) and then differs in where the text and the images come from:

  m2io         the generator writes the text; the GRPO inserter (`{workdir}/final`) places candidate images in it
  m2io-sft     the same with the inserter saved after SFT (`{workdir}/sft`): the ablation without RL
  rule         the generator's text; each candidate follows the sentence most similar to its caption
               (`inserter.baselines`), threshold from the run's eval.json "rule" entry, else chosen on the
               validation split by mean reward (`inserter.evaluation.choose_rule_threshold`)
  llm          MRAMG-Bench's LLM-based method: the llm-mode generator (`{workdir}/generator_llm`) sees the
               candidates' ids and captions and writes the `<imgN>` placeholders itself, in one pass; its candidates
               are numbered in order of first appearance (MRAMG-Bench's format, as the generator was trained)
  oracle-text  the GRPO inserter on the gold answer text (its markers removed): insertion quality alone; on the
               validation split it decodes exactly what the trainer's eval.json scored

The inserter decodes greedily, as the run's held-out evaluation does (`config.eval.max_new_tokens`,
`config.eval.batch_size`, `inserter.evaluation.greedy_completions`), in the configured output format
(`config.inserter.output_format`: `inline` or `anchors`); its completion is read by `inserter.formats`.

    system = build_system("m2io", config, workdir, dataset=dataset)     # config: the run's config + `systems`
    for answer in system.answer(questions):                              # many questions, batched
        print(answer.text, answer.images, answer.timings)

Questions without a candidate image (retrieval found none) and questions whose inserter prompt exceeds
`pipeline.max_prompt_tokens` even with one candidate get their text with no image placeholder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ml_collections

from m2io_jax import cli, generator, models, sharding
from m2io_jax.data import mramg
from m2io_jax.eval import metrics
from m2io_jax.inserter import baselines, evaluation, formats, pipeline
from m2io_jax.inserter.candidates import Candidates, candidates_for_split
from m2io_jax.inserter.example import InsertionExample, example_from_answer, example_from_question
from m2io_jax.inserter.shuffle import shuffle_candidates
from m2io_jax.inserter.sources import SplitDataset
from m2io_jax.inserter.task import decode_completion
from m2io_jax.models import sentence_encoder
from m2io_jax.models.qwen2_5_vl_processor import IMAGE_PAD, Qwen2_5_VLProcessor
from m2io_jax.retrieval import index_cache
from m2io_jax.retrieval import retriever as retriever_lib
from m2io_jax.retrieval.chunking import Chunk
from m2io_jax.run_log import say

SYSTEM_NAMES = ("m2io", "m2io-sft", "rule", "llm", "oracle-text")
STAGES = ("retrieve", "generate", "insert")
INDEX_MODES = ("cache", "load")
HELD_OUT_SPLIT = "test"  # candidates are built as for a held-out question: missed gold only under policy "always"

_TRAIN_COMMAND = "python -m m2io_jax.train --config=CONFIG --workdir={workdir}"


def get_systems_config() -> ml_collections.ConfigDict:
    """The `systems` section of a run's config: where the inserters are, the generator, questions per batch.

    Fields:
      inserter_checkpoint: the GRPO inserter (m2io, oracle-text); "" = `{workdir}/final`.
      sft_checkpoint: the inserter after SFT (m2io-sft); "" = `{workdir}/sft`.
      generator: `m2io_jax.generator.get_generator_config()`: its `checkpoint` (m2io, m2io-sft, rule; "" =
        `{workdir}/generator`) and `llm_checkpoint` (llm; "" = `{workdir}/generator_llm`), prompt and decoding.
      index: where the retrieval index comes from: "cache" (`{workdir}/index`, built there on first use) or
        "load" (it must be there: `python -m m2io_jax.retrieval.build_index` builds it).
      batch_size: questions per batch through retrieval, generation and insertion (the inserter's own decode
        batch is `config.eval.batch_size`, the generator's `generator.batch_size`).
    """
    c = ml_collections.ConfigDict()
    c.inserter_checkpoint = ""
    c.sft_checkpoint = ""
    c.generator = generator.get_generator_config()
    c.index = "cache"
    c.batch_size = 16
    return c


GENERATOR_CONFIG = "generator_config.json"
"""What `python -m m2io_jax.train_generator` writes into its workdir: the config the generators were trained with."""


def trained_generator_settings(run: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
    """Makes `run.systems.generator` the settings the workdir's demo generators were trained with (module
    docstring); returns {field: (before, after)} of the fields that changed (empty when none did or when the run
    names generator checkpoints of its own)."""
    section = run.systems.generator
    path = os.path.join(workdir, GENERATOR_CONFIG)
    if section.checkpoint or section.llm_checkpoint or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        trained = json.load(f).get("generator")
    if not isinstance(trained, dict):
        raise cli.UserError(f"{path}: no \"generator\" section; expected the config train_generator wrote")
    unknown = sorted(set(trained) - set(section.keys()))
    if unknown:
        raise cli.UserError(f"{path}: generator fields {unknown} are not in systems.generator "
                            f"({sorted(section.keys())}); expected train_generator's config of this version")
    changed = {}
    for field, value in trained.items():
        if field in ("checkpoint", "llm_checkpoint"):
            continue
        before = section[field].to_dict() if isinstance(section[field], ml_collections.ConfigDict) else section[field]
        if _comparable(before) != _comparable(value):
            changed[field] = (before, value)
            section[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return changed


def _comparable(value: Any) -> Any:
    """`value` with tuples as lists (a config's tuples come back from JSON as lists)."""
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def use_trained_generator_settings(run: ml_collections.ConfigDict, workdir: str) -> None:
    """`trained_generator_settings`, each changed field printed (what `answer` and `evaluate` run with)."""
    for field, (before, after) in trained_generator_settings(run, workdir).items():
        say(f"{workdir}: systems.generator.{field} = {after!r} as the generators were trained "
            f"({GENERATOR_CONFIG}; the run config has {before!r})")


@dataclasses.dataclass
class SystemAnswer:
    """One question's answer.

    Attributes:
      question_id: the question's id.
      text: the answer in the MRAMG prediction format: `<imgN>` placeholders where images go.
      images: the names of the placed images in the order of `text` (placeholders that name no candidate are
        left out here; `image_map` and `text` keep them, as a prediction file does).
      image_map: {"img1": image name, ...}: the candidates the placeholders refer to.
      timings: wall seconds of each stage (`STAGES`) for the batch that held this question: what it waited;
        divided by `batch_size` it is its share.
      tokens: tokens generated per stage ("generate", "insert") for this question.
      batch_size: questions in that batch.
    """

    question_id: str
    text: str
    images: list[str]
    image_map: dict[str, str]
    timings: dict[str, float]
    tokens: dict[str, int]
    batch_size: int

    def prediction(self, dataset: str) -> Any:
        """This answer as a line of a predictions file (`m2io_jax.eval.predictions.Prediction`)."""
        from m2io_jax.eval.predictions import Prediction

        return Prediction(id=self.question_id, dataset=dataset, final_output=self.text, image_map=self.image_map)


class System(Protocol):
    name: str

    def answer(self, questions: Sequence[mramg.Question]) -> list[SystemAnswer]:
        """The answers of `questions`, in order."""


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """What retrieval gives one question: its chunks (best first) and the candidate images they hold."""

    chunks: tuple[Chunk, ...]
    candidates: Candidates


@dataclasses.dataclass(frozen=True)
class Written:
    """A text answer and the tokens generated to write it."""

    text: str
    tokens: int


class Retrieval:
    """The dataset's retriever and the candidate images of each question: as the inserter's pipeline builds them
    (shuffled), or numbered in order of first appearance (`shuffle=False`: MRAMG-Bench's format, which the llm
    generator is trained on)."""

    def __init__(self, retriever: retriever_lib.Retriever, dataset: SplitDataset, config: ml_collections.ConfigDict,
                 *, shuffle: bool = True):
        self.retriever = retriever
        self.dataset = dataset
        self.config = config
        self.shuffle = shuffle

    def __call__(self, questions: Sequence[mramg.Question]) -> list[Retrieved]:
        hits = self.retriever.search([q.question for q in questions], self.config.data.retrieval.top_k)
        out = []
        for question, found in zip(questions, hits):
            chunks = tuple(hit.chunk for hit in found)
            candidates = candidates_for_split(question, chunks, self.dataset.images, split=HELD_OUT_SPLIT,
                                              settings=self.config.data.candidates)
            if self.shuffle:
                candidates = shuffle_candidates(candidates, self.config.inserter.shuffle_seed)
            out.append(Retrieved(chunks, candidates))
        return out


class ModelInserter:
    """The trained inserter (a Qwen2.5-VL checkpoint): greedy placements of the candidates in each answer text.

    `retrieval` is what `prompts` builds prompts from; a caller with prompts of its own (FTII) passes None and
    calls the inserter on them.
    """

    def __init__(self, checkpoint: str, config: ml_collections.ConfigDict, retrieval: Retrieval | None):
        mesh = sharding.make_mesh(config.mesh.to_dict()) if config.get("mesh") else None
        self.model = models.from_pretrained(checkpoint, mesh=mesh)
        self.processor = Qwen2_5_VLProcessor.from_pretrained(checkpoint, config=self.model.config,
                                                             **config.model.processor)
        tokenizer = self.processor.tokenizer
        self.stop_tokens = pipeline.stop_token_ids(tokenizer)
        self.suppress_tokens = (tokenizer.convert_tokens_to_ids(IMAGE_PAD),)
        self.config = config
        self.retrieval = retrieval

    def prompts(self, questions: Sequence[mramg.Question], retrieved: Sequence[Retrieved],
                answers: Sequence[str] | None) -> list[pipeline.PromptExample | None]:
        """Each question's prompt within the budget (`pipeline.fit_prompt`), showing its text of `answers` (None:
        the gold answer, as in training); None for a question without candidates or room."""
        if self.retrieval is None:
            raise ValueError("ModelInserter.prompts needs the retrieval it was built with (built with None)")
        out = []
        for i, (question, found) in enumerate(zip(questions, retrieved)):
            if not found.candidates.image_map:
                out.append(None)
                continue
            make_example: Callable[[mramg.Question, Candidates], InsertionExample] = example_from_question
            if answers is not None:
                make_example = functools.partial(_example_with_answer, answers[i])
            out.append(pipeline.fit_prompt(
                self.retrieval.dataset, question, list(found.chunks), HELD_OUT_SPLIT, make_example=make_example,
                retriever=self.retrieval.retriever, processor=self.processor, data=self.config.data,
                inserter=self.config.inserter, pipeline=self.config.pipeline))
        return out

    def __call__(self, prompts: Sequence[pipeline.PromptExample | None]) -> list[tuple[str, int] | None]:
        """(inline text with `<imgN>`, completion tokens) of each prompt; None where the prompt is None."""
        present = [p for p in prompts if p is not None]
        completions = evaluation.greedy_completions(
            self.model, present, max_new_tokens=self.config.eval.max_new_tokens,
            batch_size=self.config.eval.batch_size, stop_tokens=self.stop_tokens,
            suppress_tokens=self.suppress_tokens) if present else []
        inserter = self.config.inserter
        done = iter(completions)
        out: list[tuple[str, int] | None] = []
        for prompt in prompts:
            if prompt is None:
                out.append(None)
                continue
            ids = next(done)
            example = prompt.example
            parsed = formats.parse_completion(
                decode_completion(self.processor.tokenizer, ids, self.stop_tokens),
                output_format=inserter.output_format, think=inserter.think, answer=example.answer,
                candidate_ids=example.candidate_ids)
            out.append((parsed.inline_text or example.answer, completion_length(ids, self.stop_tokens)))
        return out


def _example_with_answer(answer: str, question: mramg.Question, candidates: Candidates) -> InsertionExample:
    return example_from_answer(question, answer, candidates)


def completion_length(token_ids: Sequence[int], stop_tokens: Sequence[int]) -> int:
    """Tokens the sampler generated for a completion: up to and including its first stop token."""
    stops = set(stop_tokens)
    for i, token in enumerate(token_ids):
        if int(token) in stops:
            return i + 1
    return len(token_ids)


class PipelineSystem:
    """Retrieval, then a text (`write`), then images placed in it (`place`); the stages of every system."""

    def __init__(self, name: str, retrieval: Retrieval, *, batch_size: int,
                 write: Callable[[Sequence[mramg.Question], Sequence[Retrieved]], list[Written]],
                 place: Callable[[Sequence[mramg.Question], Sequence[Retrieved], Sequence[Written]],
                                 list[tuple[str, int] | None]] | None):
        if batch_size < 1:
            raise ValueError(f"config.systems.batch_size={batch_size}: expected >= 1")
        self.name = name
        self.retrieval = retrieval
        self.batch_size = batch_size
        self.write = write
        self.place = place

    def answer(self, questions: Sequence[mramg.Question]) -> list[SystemAnswer]:
        """The answers of `questions`, in order, `batch_size` questions per batch through every stage."""
        out = []
        for start in range(0, len(questions), self.batch_size):
            out += self._answer_batch(list(questions[start:start + self.batch_size]))
        return out

    def _answer_batch(self, questions: list[mramg.Question]) -> list[SystemAnswer]:
        timings = dict.fromkeys(STAGES, 0.0)
        begin = time.perf_counter()
        retrieved = self.retrieval(questions)
        timings["retrieve"] = time.perf_counter() - begin
        begin = time.perf_counter()
        written = self.write(questions, retrieved)
        timings["generate"] = time.perf_counter() - begin
        placed: list[tuple[str, int] | None] = [None] * len(questions)
        if self.place is not None:
            begin = time.perf_counter()
            placed = self.place(questions, retrieved, written)
            timings["insert"] = time.perf_counter() - begin
        out = []
        for question, found, text, insertion in zip(questions, retrieved, written, placed):
            image_map = dict(found.candidates.image_map)
            final = text.text if insertion is None else insertion[0]
            if not image_map:
                final = metrics.strip_image_markers(final)
            images = [image_map[m] for m in metrics.image_markers(final) if m in image_map]
            out.append(SystemAnswer(
                question_id=question.id, text=final, images=images, image_map=image_map, timings=dict(timings),
                tokens={"generate": text.tokens, "insert": 0 if insertion is None else insertion[1]},
                batch_size=len(questions)))
        return out


def inserter_checkpoint(configured: str, workdir: str, default: str) -> str:
    """`configured`, or `{workdir}/{default}`; a UserError naming the command that creates it when it is missing."""
    path = configured or os.path.join(workdir, default)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise cli.UserError(f"{path}: no inserter checkpoint (no config.json); train one with "
                            f"{_TRAIN_COMMAND.format(workdir=workdir)} or set config.systems.inserter_checkpoint / "
                            f"sft_checkpoint to a Hugging Face Qwen2.5-VL directory")
    return path


def systems_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.systems`, or the defaults of `get_systems_config` for a run config without that section (the
    training configs: a config file adds it with `c.systems = systems.get_systems_config()`, and then
    `--config.systems.*` overrides work)."""
    return config.systems if "systems" in config else get_systems_config()


def rule_threshold(config: ml_collections.ConfigDict, workdir: str, dataset: SplitDataset, retrieval: Retrieval,
                   encoder: baselines.SentenceEncoder) -> float:
    """The rule baseline's threshold: the run's eval.json "rule" entry, else chosen on the validation split."""
    path = os.path.join(workdir, "eval.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rule = json.load(f).get("rule")
        if rule is not None:
            if "threshold" not in rule:
                raise cli.UserError(f"{path}: the \"rule\" entry has no \"threshold\"; expected the trainer's record")
            return float(rule["threshold"])
    questions = dataset.questions_of("validation")
    if not questions:
        raise cli.UserError(f"{path} holds no rule threshold and dataset {dataset.name} has no validation question "
                            f"to choose one on")
    found = retrieval.retriever.search([q.question for q in questions], config.data.retrieval.top_k)
    examples = []
    for question, hits in zip(questions, found):
        candidates = candidates_for_split(question, [h.chunk for h in hits], dataset.images, split="validation",
                                          settings=config.data.candidates,
                                          extra_chunks=retriever_lib.gold_chunks(question, retrieval.retriever))
        example = example_from_question(question, shuffle_candidates(candidates, config.inserter.shuffle_seed))
        examples.append(pipeline.PromptExample(example=example, prompt_ids=(), images=None, target_ids=None))
    threshold, _ = evaluation.choose_rule_threshold(examples, encoder, config.inserter)
    return threshold


def build_retrieval(config: ml_collections.ConfigDict, workdir: str, dataset: SplitDataset,
                    encoder: retriever_lib.Encoder) -> Retrieval:
    """The retrieval over `dataset`'s whole corpus, its index from `{workdir}/index` (`retrieval.index_cache`):
    loaded when present and current, else built and cached there (`config.systems.index="cache"`), or an error
    naming `python -m m2io_jax.retrieval.build_index` (`"load"`)."""
    directory = index_cache.index_dir(workdir)
    mode = systems_section(config).index
    if mode == "cache":
        retriever = index_cache.load_or_build(directory, config.data, encoder, [dataset])[dataset.name]
    elif mode == "load":
        try:
            retriever = index_cache.load(directory, dataset.name, dataset.documents, config.data, encoder)
        except (FileNotFoundError, ValueError) as missing:
            raise cli.UserError(str(missing)) from missing
    else:
        raise cli.UserError(f"config.systems.index={mode!r}: expected one of {INDEX_MODES}")
    return Retrieval(retriever, dataset, config)


def build_system(name: str, config: ml_collections.ConfigDict, workdir: str, *, dataset: SplitDataset,
                 encoder: Any = None) -> System:
    """The system `name` (one of `SYSTEM_NAMES`) over `dataset`'s corpus, its models loaded from `workdir` or
    from the checkpoints `config.systems` names.

    Args:
      config: a run config (the train config's sections: data, inserter, pipeline, eval, model, mesh) with a
        `systems` section (`get_systems_config`; its defaults when absent).
      workdir: the training run's directory (final/, sft/, generator/, generator_llm/, eval.json).
      dataset: the questions' dataset: its documents are the retrieval corpus, its images the candidates.
      encoder: the retrieval encoder (default: `sentence_encoder.load_encoder(config.data.retrieval.encoder_path)`).

    Raises:
      cli.UserError: an unknown name, or a checkpoint that is missing (naming the command that creates it).
    """
    if name not in SYSTEM_NAMES:
        raise cli.UserError(f"system {name!r}: expected one of {SYSTEM_NAMES}")
    section = systems_section(config)
    inserter_path = None
    if name in ("m2io", "oracle-text"):
        inserter_path = inserter_checkpoint(section.inserter_checkpoint, workdir, "final")
    elif name == "m2io-sft":
        inserter_path = inserter_checkpoint(section.sft_checkpoint, workdir, "sft")
    generator_path = None
    if name != "oracle-text":
        generator_path = generator.checkpoint_path(section.generator, workdir,
                                                   generator.LLM if name == "llm" else generator.TEXT)
    encoder = encoder if encoder is not None else sentence_encoder.load_encoder(config.data.retrieval.encoder_path)
    retrieval = build_retrieval(config, workdir, dataset, encoder)

    if name == "oracle-text":
        inserter = ModelInserter(inserter_path, config, retrieval)

        def gold(questions: Sequence[mramg.Question], retrieved: Sequence[Retrieved]) -> list[Written]:
            return [Written(q.answer or metrics.strip_image_markers(q.ground_truth), 0) for q in questions]

        def insert_gold(questions, retrieved, written):
            return inserter(inserter.prompts(questions, retrieved, answers=None))

        return PipelineSystem(name, retrieval, batch_size=section.batch_size, write=gold, place=insert_gold)

    text_generator = generator.Generator.from_pretrained(generator_path, section.generator)

    if name == "llm":
        def write_with_images(questions, retrieved):
            inputs = [generator.llm_inputs(r.candidates) for r in retrieved]
            generated = text_generator.answer([q.question for q in questions], [passages for passages, _ in inputs],
                                              images=[images for _, images in inputs])
            return [Written(g.text, g.num_tokens) for g in generated]

        in_order = Retrieval(retrieval.retriever, dataset, config, shuffle=False)
        return PipelineSystem(name, in_order, batch_size=section.batch_size, write=write_with_images, place=None)

    def write(questions: Sequence[mramg.Question], retrieved: Sequence[Retrieved]) -> list[Written]:
        generated = text_generator.answer([q.question for q in questions],
                                          [generator.text_passages(r.chunks) for r in retrieved])
        return [Written(metrics.strip_image_markers(g.text), g.num_tokens) for g in generated]

    if name == "rule":
        threshold = rule_threshold(config, workdir, dataset, retrieval, encoder)

        def insert_rule(questions, retrieved, written):
            out = []
            for question, found, text in zip(questions, retrieved, written):
                example = example_from_answer(question, text.text, found.candidates)
                placements = baselines.rule_placements(example, encoder, threshold=threshold)
                out.append((formats.assemble_inline(example.answer, placements), 0))
            return out

        return PipelineSystem(name, retrieval, batch_size=section.batch_size, write=write, place=insert_rule)

    inserter = ModelInserter(inserter_path, config, retrieval)

    def insert_model(questions, retrieved, written):
        return inserter(inserter.prompts(questions, retrieved, answers=[w.text for w in written]))

    return PipelineSystem(name, retrieval, batch_size=section.batch_size, write=write, place=insert_model)
