"""The inserter's data pipeline: questions of a split -> retrieval -> candidates -> prompts -> grain batches.

For each question of a split: its top-k chunks (`Retriever`), the candidates (`candidates_for_split`, so gold
images retrieval missed are added for `train` only under the default policy), a seeded per-question shuffle
(`shuffle_candidates`), the `InsertionExample`, its prompt (`build_prompt`) and the processor's token ids (image
pads expanded) and pixel values. Training examples also get the SFT target: the gold placements rendered in
the configured format (`formats.render_completion`), tokenized, followed by the end-of-turn stop token.

A prompt longer than `max_prompt_tokens` is handled by the `over_budget` policy, never silently:
  drop_candidates  rebuild the candidates with one image fewer (the lowest-ranked: `build_candidates` keeps
                   the first images in retrieval order, and gold ones first where missed gold is added) until
                   the prompt fits; counted in `truncated` and `dropped_candidates`. An example that does not
                   fit even with one candidate is left out and counted in `over_budget`.
  skip             leave the example out; counted in `over_budget`.

Retrieval and image processing happen once per run: `build_examples` returns every example of a split in
memory (the demo corpus is small; MRAMG-Bench's 4,800 questions fit too), and `batches` draws shuffled
global batches from them with grain (the same on every process), reshuffled every epoch, in an order fixed by
the seed.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from m2io_jax.inserter import formats
from m2io_jax.inserter.candidates import Candidates, candidates_for_split
from m2io_jax.inserter.example import InsertionExample, example_from_question
from m2io_jax.inserter.prompt import build_prompt
from m2io_jax.inserter.shuffle import shuffle_candidates
from m2io_jax.inserter.sources import SplitDataset, corpus_texts
from m2io_jax.retrieval import retriever as retriever_lib

END_OF_TURN = "<|im_end|>"  # ends the assistant's turn in the Qwen chat format: the SFT target's last token
END_OF_TEXT = "<|endoftext|>"
OVER_BUDGET_POLICIES = ("drop_candidates", "skip")
COUNTS = ("questions", "examples", "truncated", "dropped_candidates", "over_budget", "no_sft_target",
          "gold_missing")
"""Counts of `build_examples`: questions read; examples kept; examples that lost candidates to fit the budget
and how many candidates they lost; questions left out because their prompt does not fit; examples without an
SFT target (gold anchors unknown); gold images absent from the candidates."""


def get_pipeline_config() -> ml_collections.ConfigDict:
    """Defaults of the pipeline's own knobs (the train config's `pipeline` section).

    Fields:
      max_prompt_tokens: prompt budget in tokens, image tokens included.
      over_budget: what happens to a longer prompt ("drop_candidates" or "skip", see the module docstring).
    """
    c = ml_collections.ConfigDict()
    c.max_prompt_tokens = 2048
    c.over_budget = "drop_candidates"
    return c


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """One example ready for the model.

    Attributes:
      example: what the prompt shows and the rewards score against.
      prompt_ids: [T] the prompt's token ids, each image's `<|image_pad|>` expanded to its feature count.
      images: the processor output of the prompt's images, `{"pixel_values": [P, C*T*P*P],
        "image_grid_thw": [N, 3]}`, or None when it shows no image (what `sampling.generate` takes per prompt).
      target_ids: the SFT target (gold placements in the configured format) and the stop token, or None when
        the gold anchors are unknown.
      dropped_candidates: candidates dropped to fit the prompt budget.
    """

    example: InsertionExample
    prompt_ids: tuple[int, ...]
    images: Mapping[str, np.ndarray] | None
    target_ids: tuple[int, ...] | None
    dropped_candidates: int = 0


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end a completion: end of turn (what SFT targets end with), then end of text."""
    ids = tuple(tokenizer.convert_tokens_to_ids(token) for token in (END_OF_TURN, END_OF_TEXT))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer maps ({END_OF_TURN}, {END_OF_TEXT}) to {ids}; expected both as tokens")
    return ids


def sft_target_ids(example: InsertionExample, tokenizer: Any,
                   inserter: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The gold placements of `example` rendered in `inserter.output_format`, tokenized, plus the end-of-turn token.

    None when the gold anchors are unknown (there is nothing right to imitate).
    """
    if example.gold_anchors is None:
        return None
    text = formats.render_completion(example.answer, example.gold_anchors, output_format=inserter.output_format,
                                     think=inserter.think)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + stop_token_ids(tokenizer)[:1]


def tokenizer_texts(datasets: Sequence[SplitDataset], inserter: ml_collections.ConfigDict, *, max_images: int,
                    max_sentences: int = 16) -> list[str]:
    """Texts to train a tiny tokenizer on: the corpus, each question's prompt text and rendered completions.

    The prompt text is `build_prompt`'s (question, numbered answer, a candidate with its caption, instruction),
    once per question, as often as it occurs in training. The completions place every candidate id
    `<img1>..<img{max_images}>` after every sentence number up to `max_sentences` in the configured format, so
    that what the inserter writes (e.g. `<img3>@2`) tokenizes short.
    """
    texts = corpus_texts(datasets)
    texts += [_prompt_text(question, ds, inserter) for ds in datasets for question in ds.questions]
    answer = " ".join(f"Sentence {i}." for i in range(max_sentences))
    for image in range(1, max_images + 1):
        for sentence in range(-1, max_sentences):
            placement = formats.Placement(f"img{image}", sentence)
            texts.append(formats.render_completion(answer, [placement], output_format=inserter.output_format,
                                                   think=inserter.think))
    return texts


def _prompt_text(question: Any, dataset: SplitDataset, inserter: ml_collections.ConfigDict) -> str:
    """The text of `question`'s prompt with its first gold image that has a file as the one candidate."""
    names = [name for name in question.images if name in dataset.images and dataset.images[name].path][:1]
    candidates = Candidates(
        question_id=question.id, dataset=dataset.name, chunks=(), contexts=(),
        image_map={f"img{i + 1}": name for i, name in enumerate(names)},
        captions=tuple(dataset.images[name].caption for name in names), gold=(), gold_missing=(), added_gold=())
    example = InsertionExample(question.question, question.answer or question.ground_truth, candidates)
    prompt = build_prompt(example, dataset.images, inserter)
    return "".join(part["text"] for message in prompt.messages for part in message["content"] if "text" in part)


def build_retrievers(datasets: Sequence[SplitDataset], data: ml_collections.ConfigDict,
                     encoder: retriever_lib.Encoder) -> dict[str, retriever_lib.Retriever]:
    """One retriever per dataset over its whole corpus (chunking and retrieval settings of the data config)."""
    return {ds.name: retriever_lib.Retriever.from_config(ds.documents, encoder, data) for ds in datasets}


def build_examples(
    dataset: SplitDataset,
    split: str,
    *,
    retriever: retriever_lib.Retriever,
    processor: Any,
    data: ml_collections.ConfigDict,
    inserter: ml_collections.ConfigDict,
    pipeline: ml_collections.ConfigDict,
) -> tuple[list[PromptExample], collections.Counter]:
    """Every example of `split` of `dataset`, in question order, and the `COUNTS` of what happened.

    Args:
      retriever: the dataset's retriever (`build_retrievers`).
      processor: a `Qwen2_5_VLProcessor` (tokenizer, image processor, chat template).
      data: the data config (`retrieval.top_k`, `candidates`).
      inserter: the inserter config (`output_format`, `think`, `prompt.show_captions`, `shuffle_seed`).
      pipeline: `get_pipeline_config()` fields.
    """
    if pipeline.over_budget not in OVER_BUDGET_POLICIES:
        raise ValueError(f"config.pipeline.over_budget={pipeline.over_budget!r}: expected one of "
                         f"{OVER_BUDGET_POLICIES}")
    questions = dataset.questions_of(split)
    counts = collections.Counter({name: 0 for name in COUNTS})
    counts["questions"] = len(questions)
    hits = retriever.search([q.question for q in questions], data.retrieval.top_k) if questions else []
    out = []
    for question, found in zip(questions, hits):
        prepared = _fit_prompt(dataset, question, [hit.chunk for hit in found], split, retriever=retriever,
                               processor=processor, data=data, inserter=inserter, pipeline=pipeline)
        if prepared is None:
            counts["over_budget"] += 1
            continue
        counts["examples"] += 1
        counts["truncated"] += prepared.dropped_candidates > 0
        counts["dropped_candidates"] += prepared.dropped_candidates
        counts["no_sft_target"] += prepared.target_ids is None
        counts["gold_missing"] += len(prepared.example.candidates.gold_missing)
        out.append(prepared)
    return out, counts


def _fit_prompt(dataset: SplitDataset, question: Any, retrieved: list, split: str, *,
                retriever: retriever_lib.Retriever, processor: Any, data: ml_collections.ConfigDict,
                inserter: ml_collections.ConfigDict, pipeline: ml_collections.ConfigDict) -> PromptExample | None:
    """The example of `question` within the prompt budget under the `over_budget` policy; None when none fits."""
    return fit_prompt(dataset, question, retrieved, split, make_example=example_from_question, retriever=retriever,
                      processor=processor, data=data, inserter=inserter, pipeline=pipeline)


def fit_prompt(dataset: SplitDataset, question: Any, retrieved: Sequence[Any], split: str, *,
               make_example: Callable[[Any, Candidates], InsertionExample], retriever: retriever_lib.Retriever,
               processor: Any, data: ml_collections.ConfigDict, inserter: ml_collections.ConfigDict,
               pipeline: ml_collections.ConfigDict) -> PromptExample | None:
    """The example `make_example(question, candidates)` builds, within the prompt budget under the `over_budget`
    policy; None when none fits.

    Training and held-out evaluation make it from the gold answer (`example_from_question`); the systems of
    `m2io_jax.systems` from a generated answer (`example.example_from_answer`). `retrieved`: the question's
    chunks, best first; `split` decides with `data.candidates.missed_gold` whether missed gold is added.
    """
    max_images = data.candidates.max_images
    initial: int | None = None
    while True:
        settings = ml_collections.ConfigDict({"max_images": max_images, "missed_gold": data.candidates.missed_gold})
        candidates = candidates_for_split(question, retrieved, dataset.images, split=split, settings=settings,
                                          extra_chunks=retriever_lib.gold_chunks(question, retriever))
        candidates = shuffle_candidates(candidates, inserter.shuffle_seed)
        count = len(candidates.image_map)
        if initial is None:
            initial = count
        example = make_example(question, candidates)
        prompt = build_prompt(example, dataset.images, inserter)
        processed = processor([list(prompt.messages)], images=[list(prompt.image_files)])
        prompt_ids = tuple(int(i) for i in processed.input_ids[0][processed.attention_mask[0] == 1])  # [T]
        if len(prompt_ids) <= pipeline.max_prompt_tokens:
            images = None if processed.pixel_values is None else {
                "pixel_values": processed.pixel_values, "image_grid_thw": processed.image_grid_thw}
            return PromptExample(example=example, prompt_ids=prompt_ids, images=images,
                                 target_ids=sft_target_ids(example, processor.tokenizer, inserter),
                                 dropped_candidates=initial - count)
        if pipeline.over_budget == "skip" or count <= 1:
            return None
        max_images = count - 1


def batches(examples: Sequence[PromptExample], *, batch_size: int, seed: int) -> Iterator[list[PromptExample]]:
    """Endless global batches of `batch_size` examples, reshuffled every epoch, in an order fixed by `seed`.

    Every process of a multi-process run iterates the same global batches: the trainer prepares the whole batch
    on each host (a few prompts, cheap next to a rollout) and hands it to jit as replicated host input, while
    the device arrays it becomes are sharded over all processes' devices (`m2io_jax.rl.trainer`). The iterator's
    `get_state()` / `set_state()` are its position, which checkpoints hold.
    """
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} examples are fewer than batch_size={batch_size}")
    source = grain.MapDataset.source(list(examples))
    return iter(source.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True, batch_fn=list))
