"""FTII-style evaluation (Flow Text with Image Insertion, FTII-Bench): the image after each paragraph.

FTII-Bench gives a model an article's paragraphs and candidate images and asks, paragraph by paragraph, which
image follows. We build the same problem from MRAMG-format step-by-step documents (the demo's `demo_recipe` and
`demo_manual`, MRAMG-Bench's `recipe` and `manual`): a document's text is cut at its `<PIC>` markers, so each
paragraph is the text up to an image and its gold images are those written right after it (text after the
last image is a paragraph without image). A document with more than `max_images` images becomes several
problems, windows of consecutive paragraphs holding at most `max_images` images each; when a window's prompt
exceeds the inserter's prompt budget, the document is cut into smaller windows until each fits (`fit_prompts`).

The problem is posed as the inserter's own task (`FtiiProblem.example`: an `InsertionExample` whose answer is
the window's paragraphs, one per line, and whose candidates are the window's images, shuffled per problem by
`shuffle_candidates`), so the trained inserter's prompt (`prompt.build_prompt`) and output formats
(`formats`) serve unchanged; the question line says what is asked (`QUESTION`). The prompt numbers sentences:
a placement after any sentence of a paragraph counts as placed after that paragraph (in the demo each
paragraph before an image is one sentence).

Score (`score`): per paragraph, the images placed after it in the order written are compared position by
position with its gold images; `accuracy` is the share of gold (paragraph, image) slots filled with the right
image, `precision` the share of placed images that fill a right slot. The `rule` baseline
(`baselines.rule_placements`: each candidate after the sentence most similar to its caption) is scored on the
same problems. Which documents: those cited by the questions of a split (a document no question cites belongs
to no split).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib
from m2io_jax.inserter import baselines
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.example import InsertionExample
from m2io_jax.inserter.formats import Placement
from m2io_jax.inserter.pipeline import PromptExample
from m2io_jax.inserter.prompt import build_prompt
from m2io_jax.inserter.shuffle import shuffle_candidates
from m2io_jax.inserter.sources import SplitDataset

QUESTION = "Which image goes after each paragraph of this document?"
METRICS = ("accuracy", "precision", "slots", "placed", "problems", "over_budget")


@dataclasses.dataclass(frozen=True)
class Paragraph:
    """A document's text up to an image (or its end) and the images written right after it, in order."""

    text: str
    images: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FtiiProblem:
    """One window of a document posed as an insertion example.

    Attributes:
      problem_id: `{document id}:{first paragraph}` (also the shuffle key of the candidates).
      dataset: the dataset's name.
      example: the paragraphs as the answer (one per line), the window's images as candidates; gold anchors:
        each gold image after its paragraph's last sentence.
      paragraph_of_sentence: [S] the paragraph (0-based in the window) of each sentence of `example.answer`.
      gold: per paragraph, the candidate ids of its gold images, in order.
    """

    problem_id: str
    dataset: str
    example: InsertionExample
    paragraph_of_sentence: tuple[int, ...]
    gold: tuple[tuple[str, ...], ...]


def paragraphs(document: mramg.Document) -> list[Paragraph]:
    """`document` cut at its `<PIC>` markers: each paragraph with the images that follow it.

    Markers with no text between them put several images after one paragraph; leading images (before any text)
    are dropped, since nothing precedes them.
    """
    pieces = sentences_lib.PIC_RE.split(document.content)
    if len(pieces) - 1 != len(document.images):
        raise ValueError(f"document {document.id} ({document.dataset}): {len(pieces) - 1} <PIC> markers but "
                         f"{len(document.images)} images listed; expected one image per marker")
    out: list[Paragraph] = []
    for k, piece in enumerate(pieces):
        text = " ".join(piece.split())
        image = document.images[k] if k < len(document.images) else None
        if text:
            out.append(Paragraph(text, () if image is None else (image,)))
        elif image is not None and out:
            out[-1] = Paragraph(out[-1].text, out[-1].images + (image,))
    return out


def windows(parts: Sequence[Paragraph], max_images: int) -> list[tuple[int, list[Paragraph]]]:
    """Consecutive runs of paragraphs (first index, paragraphs) holding at most `max_images` images each; a run
    starts at a paragraph with an image and ends with one (text-only paragraphs between them stay)."""
    if max_images < 1:
        raise ValueError(f"config.ftii.max_images={max_images}: expected >= 1")
    out: list[tuple[int, list[Paragraph]]] = []
    current: list[Paragraph] = []
    start = count = 0
    for index, part in enumerate(parts):
        if not current and not part.images:
            continue
        if current and count + len(part.images) > max_images:
            out.append((start, _trim(current)))
            current, count = [], 0
        if not current:
            start = index
        current.append(part)
        count += len(part.images)
    if current and count:
        out.append((start, _trim(current)))
    return out


def _trim(parts: list[Paragraph]) -> list[Paragraph]:
    """`parts` without the text-only paragraphs after its last image."""
    last = max(i for i, part in enumerate(parts) if part.images)
    return parts[:last + 1]


def build_problem(document: mramg.Document, first: int, parts: Sequence[Paragraph],
                  images: Mapping[str, mramg.ImageInfo], shuffle_seed: int) -> FtiiProblem:
    """The `FtiiProblem` of the window `parts` (starting at paragraph `first`) of `document`."""
    names = [name for part in parts for name in part.images]
    problem_id = f"{document.id}:{first}"
    ordered = Candidates(
        question_id=problem_id, dataset=document.dataset, chunks=(), contexts=(),
        image_map={f"img{i + 1}": name for i, name in enumerate(names)},
        captions=tuple(images[name].caption if name in images else "" for name in names),
        gold=tuple(f"img{i + 1}" for i in range(len(names))), gold_missing=(), added_gold=())
    candidates = shuffle_candidates(ordered, shuffle_seed)
    tag = candidates.name_to_tag
    answer = "\n".join(part.text for part in parts)
    paragraph_of_sentence: list[int] = []
    for index, part in enumerate(parts):
        paragraph_of_sentence += [index] * len(sentences_lib.split_sentences(part.text))
    last_sentence = [max(i for i, p in enumerate(paragraph_of_sentence) if p == index) for index in range(len(parts))]
    anchors = tuple(Placement(tag[name], last_sentence[index]) for index, part in enumerate(parts)
                    for name in part.images)
    example = InsertionExample(question=QUESTION, answer=answer, candidates=candidates, gold_anchors=anchors)
    if len(example.sentences) != len(paragraph_of_sentence):
        raise ValueError(f"problem {problem_id}: {len(example.sentences)} sentences in the joined paragraphs but "
                         f"{len(paragraph_of_sentence)} counted per paragraph; expected paragraphs to split alike")
    return FtiiProblem(problem_id, document.dataset, example, tuple(paragraph_of_sentence),
                       tuple(tuple(tag[name] for name in part.images) for part in parts))


def split_documents(dataset: SplitDataset, split: str) -> list[mramg.Document]:
    """The documents cited by the questions of `split`, in the dataset's document order."""
    cited = {doc_id for question in dataset.questions_of(split) for doc_id in question.provenance}
    return [document for doc_id, document in dataset.documents.items() if doc_id in cited]


def build_problems(dataset: SplitDataset, split: str, settings: ml_collections.ConfigDict,
                   shuffle_seed: int) -> list[FtiiProblem]:
    """Every problem of the documents of `split` (`settings`: the `ftii` section, max_images and max_problems),
    candidates shuffled with `shuffle_seed` (the inserter config's)."""
    problems = [problem for document in split_documents(dataset, split)
                for problem in document_problems(document, dataset.images, settings.max_images, shuffle_seed)]
    return problems[:settings.max_problems or None]


def document_problems(document: mramg.Document, images: Mapping[str, mramg.ImageInfo], max_images: int,
                      shuffle_seed: int) -> list[FtiiProblem]:
    """The problems of one document: its windows of at most `max_images` images."""
    return [build_problem(document, first, parts, images, shuffle_seed)
            for first, parts in windows(paragraphs(document), max_images)]


def fit_prompts(dataset: SplitDataset, split: str, settings: ml_collections.ConfigDict, shuffle_seed: int, *,
                processor: Any, inserter: ml_collections.ConfigDict,
                max_prompt_tokens: int) -> tuple[list[FtiiProblem], list[PromptExample | None]]:
    """The problems of `split` and their prompts within `max_prompt_tokens`: a document with a window over the
    budget is cut into smaller windows (fewer images each, down to one) until every window fits; a window of
    one image that does not fit keeps a None prompt (`score` counts it in `over_budget`)."""
    problems: list[FtiiProblem] = []
    prompts: list[PromptExample | None] = []
    for document in split_documents(dataset, split):
        for max_images in range(settings.max_images, 0, -1):
            found = document_problems(document, dataset.images, max_images, shuffle_seed)
            made = [prompt_example(p, dataset.images, processor, inserter, max_prompt_tokens) for p in found]
            if all(m is not None for m in made) or max_images == 1:
                break
        problems += found
        prompts += made
    keep = settings.max_problems or None
    return problems[:keep], prompts[:keep]


def prompt_example(problem: FtiiProblem, images: Mapping[str, mramg.ImageInfo], processor: Any,
                   inserter: ml_collections.ConfigDict, max_prompt_tokens: int) -> PromptExample | None:
    """The problem's prompt as the inserter's model takes it (token ids, pixels); None over the prompt budget."""
    prompt = build_prompt(problem.example, images, inserter)
    processed = processor([list(prompt.messages)], images=[list(prompt.image_files)])
    prompt_ids = tuple(int(i) for i in processed.input_ids[0][processed.attention_mask[0] == 1])  # [T]
    if len(prompt_ids) > max_prompt_tokens:
        return None
    pixels = None if processed.pixel_values is None else {
        "pixel_values": processed.pixel_values, "image_grid_thw": processed.image_grid_thw}
    return PromptExample(example=problem.example, prompt_ids=prompt_ids, images=pixels, target_ids=None)


def placements_of(inline_text: str) -> list[Placement]:
    """The placements an inline answer states (`<imgN>` after sentence k), as `formats.parse_completion` reads
    the inline format."""
    marked = sentences_lib.locate_markers(inline_text, sentences_lib.IMG_RE)
    return [Placement(marker[1:-1], index) for marker, index in zip(marked.markers, marked.follows)]


def rule_placements(problem: FtiiProblem, encoder: baselines.SentenceEncoder, threshold: float) -> list[Placement]:
    """The `rule` baseline's placements on the problem."""
    return list(baselines.rule_placements(problem.example, encoder, threshold=threshold))


def score(problems: Sequence[FtiiProblem], placements: Sequence[Sequence[Placement] | None]) -> dict[str, float]:
    """`METRICS` of each problem's placements (None: the problem's prompt was over budget; its slots count as
    missed and it is counted in `over_budget`)."""
    if len(problems) != len(placements):
        raise ValueError(f"{len(placements)} placement lists for {len(problems)} problems: expected one per problem")
    hits = slots = placed = over_budget = 0
    for problem, chosen in zip(problems, placements):
        slots += sum(len(gold) for gold in problem.gold)
        if chosen is None:
            over_budget += 1
            continue
        after: list[list[str]] = [[] for _ in problem.gold]
        for placement in chosen:
            if 0 <= placement.sentence < len(problem.paragraph_of_sentence):
                after[problem.paragraph_of_sentence[placement.sentence]].append(placement.image)
        placed += len(chosen)
        hits += sum(p == g for gold, predicted in zip(problem.gold, after) for p, g in zip(predicted, gold))
    return {"accuracy": hits / slots if slots else math.nan, "precision": hits / placed if placed else math.nan,
            "slots": float(slots), "placed": float(placed), "problems": float(len(problems)),
            "over_budget": float(over_budget)}
