"""Candidate images and prompt context for one question, in the MRAMG-Bench generation format.

Retrieved chunks, in rank order, become `[context_i] text`, each `<PIC>` replaced by `<imgN>`; N numbers a
question's distinct images in order of first appearance (1-based). Captions follow as
`[img{N}_caption] {caption}`, one per candidate, in id order. The gold `images_list` maps to the same ids.

Two knobs, the `candidates` section of the data config (`m2io_jax.data.config`; `candidates_for_split` reads it):
  max_images: candidates beyond the first `max_images` are dropped (their markers leave the context):
    Manual documents average 65 images.
  missed gold: gold images absent from the retrieved chunks can be brought in by adding a chunk that holds
    them (`extra_chunks`, taken from the provenance documents). It is a training aid that must never touch
    evaluation: `add_missed_gold(policy, split)` decides, and the default policy adds only for `train`.
    Added chunks go to a slot chosen by a hash of the question id (not always last, so their position does
    not give them away), and, when the cap would drop a gold image, non-gold candidates go first.

`Candidates.image_map` is the `image_map` of a prediction (`m2io_jax.eval.predictions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import ml_collections

from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib
from m2io_jax.retrieval.chunking import Chunk, distinct_images

MISSED_GOLD_POLICIES = ("train", "never", "always")


def add_missed_gold(policy: str, split: str) -> bool:
    """Whether missed gold images are added for an example of `split` under `policy`."""
    if policy not in MISSED_GOLD_POLICIES:
        raise ValueError(f"missed-gold policy {policy!r}: expected one of {MISSED_GOLD_POLICIES}")
    return policy == "always" or (policy == "train" and split == "train")


@dataclasses.dataclass(frozen=True)
class Candidates:
    """What a generator or inserter sees for one question.

    Attributes:
      question_id, dataset: the question.
      chunks: the chunks in context order (retrieved, possibly with added gold chunks).
      contexts: chunk texts with `<imgN>` in place of `<PIC>` (markers of dropped images removed).
      image_map: {"img1": image name, ...} in id order.
      captions: caption of each candidate, in id order.
      gold: the gold images_list as ids ("img3", ...), gold images absent from the candidates left out.
      gold_missing: gold image names absent from the candidates.
      added_gold: gold image names brought in by the missed-gold policy.
    """

    question_id: str
    dataset: str
    chunks: tuple[Chunk, ...]
    contexts: tuple[str, ...]
    image_map: dict[str, str]
    captions: tuple[str, ...]
    gold: tuple[str, ...]
    gold_missing: tuple[str, ...]
    added_gold: tuple[str, ...]

    @property
    def context_text(self) -> str:
        return "\n".join(f"[context_{i + 1}] {text}" for i, text in enumerate(self.contexts))

    @property
    def caption_text(self) -> str:
        return "\n".join(f"[{tag}_caption] {cap}" for tag, cap in zip(self.image_map, self.captions))

    @property
    def name_to_tag(self) -> dict[str, str]:
        return {name: tag for tag, name in self.image_map.items()}


def _slot(question_id: str, n: int) -> int:
    return int(hashlib.sha256(question_id.encode()).hexdigest(), 16) % (n + 1)


def build_candidates(
    question: mramg.Question,
    retrieved: Sequence[Chunk],
    images: Mapping[str, mramg.ImageInfo],
    *,
    max_images: int,
    extra_chunks: Sequence[Chunk] = (),
    add_gold: bool = False,
) -> Candidates:
    """Numbers the candidate images of `question` and builds its context.

    Args:
      question: the question (its `images` are the gold list).
      retrieved: retrieved chunks, best first.
      images: image metadata of the dataset (captions).
      max_images: cap on candidate images.
      extra_chunks: chunks that may supply missed gold images (e.g. every chunk of the provenance
        documents); used only when `add_gold`.
      add_gold: apply the missed-gold policy (see `add_missed_gold`).
    """
    if max_images < 1:
        raise ValueError(f"max_images={max_images}: expected >= 1")
    chunks = list(retrieved)
    gold = list(dict.fromkeys(question.images))
    added: list[str] = []
    if add_gold:
        present = set(distinct_images(chunks))
        for chunk in extra_chunks:
            brings = [g for g in gold if g in chunk.images and g not in present]
            if brings:
                chunks.insert(_slot(question.id, len(chunks)), chunk)
                present.update(chunk.images)
                added.extend(brings)
    order = distinct_images(chunks)
    if len(order) > max_images:
        if add_gold:
            gold_set = set(gold)
            keep_gold = [n for n in order if n in gold_set][:max_images]
            others = [n for n in order if n not in gold_set][: max_images - len(keep_gold)]
            keep = set(keep_gold) | set(others)
            order = [n for n in order if n in keep]
        else:
            order = order[:max_images]
    tags = {name: f"img{i + 1}" for i, name in enumerate(order)}
    contexts = tuple(_substitute(chunk, tags) for chunk in chunks)
    image_map = {tag: name for name, tag in tags.items()}
    captions = tuple(images[name].caption if name in images else "" for name in order)
    return Candidates(
        question_id=question.id,
        dataset=question.dataset,
        chunks=tuple(chunks),
        contexts=contexts,
        image_map=image_map,
        captions=captions,
        gold=tuple(tags[g] for g in question.images if g in tags),
        gold_missing=tuple(g for g in gold if g not in tags),
        added_gold=tuple(added),
    )


def candidates_for_split(
    question: mramg.Question,
    retrieved: Sequence[Chunk],
    images: Mapping[str, mramg.ImageInfo],
    *,
    split: str,
    settings: ml_collections.ConfigDict,
    extra_chunks: Sequence[Chunk] = (),
) -> Candidates:
    """`build_candidates` for an example of `split`, with the `candidates` section of the data config.

    `settings.max_images` caps the candidates; `settings.missed_gold` decides, with `split`, whether
    `extra_chunks` may bring in gold images that retrieval missed (`add_missed_gold`).
    """
    return build_candidates(
        question, retrieved, images, max_images=settings.max_images, extra_chunks=extra_chunks,
        add_gold=add_missed_gold(settings.missed_gold, split),
    )


def _substitute(chunk: Chunk, tags: Mapping[str, str]) -> str:
    names = iter(chunk.images)

    def repl(_) -> str:
        name = next(names, None)
        return f"<{tags[name]}>" if name in tags else ""

    return sentences_lib.PIC_RE.sub(repl, chunk.text)


def render_gold(question: mramg.Question, candidates: Candidates) -> str:
    """The gold answer with `<imgN>` of the candidates placed after their anchor sentences.

    Gold images missing from the candidates, or without an anchor, are left out.
    """
    answer = question.answer or question.ground_truth
    spans = sentences_lib.split_sentences(answer)
    after: dict[int, list[str]] = {}
    tags = candidates.name_to_tag
    for anchor in question.anchors:
        if anchor.image in tags:
            after.setdefault(anchor.sentence_index, []).append(f"<{tags[anchor.image]}>")
    pieces = ["".join(after.get(-1, []))] if -1 in after else []
    for i, span in enumerate(spans):
        pieces.append(span.text + "".join(after.get(i, [])))
    return " ".join(pieces)
