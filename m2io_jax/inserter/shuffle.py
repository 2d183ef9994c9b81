"""Per-question candidate shuffling, so that candidate order does not give the answer away.

Candidates are numbered by first appearance in the retrieved chunks, so the gold ids of a question type are
often the same (in the demo corpus, manual assembly questions are always img3..img6). `shuffle_candidates`
renumbers them by a permutation drawn from a hash of (seed, question id): deterministic across runs,
processes and Python versions, different between questions, and consistent everywhere an id appears
(contexts, image_map, captions, gold).
"""

from __future__ import annotations

import dataclasses
import hashlib

from m2io_jax.data import sentences as sentences_lib
from m2io_jax.inserter.candidates import Candidates


def shuffled_order(question_id: str, ids: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """`ids` in the order of a keyed hash of (seed, question id, id): a permutation fixed per question."""

    def key(image_id: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{question_id}\0{image_id}".encode()).digest()

    return tuple(sorted(ids, key=key))


def shuffle_candidates(candidates: Candidates, seed: int) -> Candidates:
    """`candidates` renumbered: the image at position i of the shuffled order becomes `img{i+1}`.

    The same image keeps its name, caption and gold role under its new id; chunks and name lists are unchanged.
    """
    old_ids = tuple(candidates.image_map)
    order = shuffled_order(candidates.question_id, old_ids, seed)
    new_id = {old: f"img{i + 1}" for i, old in enumerate(order)}
    caption = dict(zip(old_ids, candidates.captions))

    def renumber(match) -> str:
        old = f"img{match.group(1)}"
        if old not in new_id:
            raise ValueError(
                f"question {candidates.question_id}: context marker <{old}> is not a candidate id; "
                f"expected one of {list(old_ids)}"
            )
        return f"<{new_id[old]}>"

    return dataclasses.replace(
        candidates,
        contexts=tuple(sentences_lib.IMG_RE.sub(renumber, text) for text in candidates.contexts),
        image_map={new_id[old]: candidates.image_map[old] for old in order},
        captions=tuple(caption[old] for old in order),
        gold=tuple(new_id[old] for old in candidates.gold),
    )
