"""One inserter example: the question, the answer text images go into, the candidates and, when known, gold.

Training uses the gold answer with its images removed (`example_from_question`); inference uses the
generator's answer and no gold. Prompts, rewards, the SFT target and the rule baseline all read this one type.
"""

from __future__ import annotations

import dataclasses

from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.formats import Placement


@dataclasses.dataclass(frozen=True)
class InsertionExample:
    """What the inserter places images into, and what it is scored against.

    Attributes:
      question: the question text.
      answer: the marker-free answer text; its sentences (`sentences_lib.split_sentences`) are the numbered ones.
      candidates: the candidate images (`candidates.gold` are the gold ids, in `images_list` order).
      gold_anchors: the gold placement of every gold candidate, in gold order; None when not all of them are
        known (the question's markers do not place its images), and then placement is not scored.
    """

    question: str
    answer: str
    candidates: Candidates
    gold_anchors: tuple[Placement, ...] | None = None

    @property
    def sentences(self) -> tuple[str, ...]:
        return tuple(span.text for span in sentences_lib.split_sentences(self.answer))

    @property
    def candidate_ids(self) -> tuple[str, ...]:
        return tuple(self.candidates.image_map)

    @property
    def gold(self) -> tuple[str, ...]:
        return self.candidates.gold


def example_from_question(question: mramg.Question, candidates: Candidates) -> InsertionExample:
    """The training example of `question`: its marker-free gold answer and gold anchors mapped to candidate ids.

    Gold anchors are kept only when every gold image among the candidates has one (else None).
    """
    tags = candidates.name_to_tag
    anchors = {}
    for anchor in question.anchors:
        if anchor.image in tags:
            anchors.setdefault(tags[anchor.image], anchor.sentence_index)
    gold_images = tuple(dict.fromkeys(candidates.gold))
    known = all(image in anchors for image in gold_images)
    gold_anchors = tuple(Placement(image, anchors[image]) for image in gold_images) if known else None
    return InsertionExample(
        question=question.question,
        answer=question.answer or question.ground_truth,
        candidates=candidates,
        gold_anchors=gold_anchors,
    )


def example_from_answer(question: mramg.Question, answer: str, candidates: Candidates) -> InsertionExample:
    """The inference example of `question`: images go into `answer` (a generator's text, its `<imgN>` markers
    removed); no gold anchors, so placement is never scored on it."""
    return InsertionExample(question=question.question, answer=answer, candidates=candidates)
