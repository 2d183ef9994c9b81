"""The rule baseline with a deterministic bag-of-words encoder (cosine = word overlap)."""

import re

import numpy as np

from m2io_jax.inserter.baselines import rule_placements
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.example import InsertionExample
from m2io_jax.inserter.formats import Placement


class BagOfWordsEncoder:
    """L2-normalised word counts over a vocabulary fixed at construction; unknown words are ignored."""

    def __init__(self, vocabulary):
        self.index = {word: i for i, word in enumerate(vocabulary)}

    def encode(self, texts):
        out = np.zeros((len(texts), len(self.index)), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word in self.index:
                    out[row, self.index[word]] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


ENCODER = BagOfWordsEncoder(["base", "stem", "shade", "arm", "dial", "flat", "clicks", "lock"])
ANSWER = "Place the base on a flat surface. Fit the stem until it clicks. Put the shade on and lock it."


def _example(captions):
    candidates = Candidates(
        question_id="q1", dataset="x", chunks=(), contexts=(),
        image_map={f"img{i + 1}": f"n{i}" for i in range(len(captions))}, captions=tuple(captions),
        gold=(), gold_missing=(), added_gold=(),
    )
    return InsertionExample("How?", ANSWER, candidates)


def test_each_candidate_follows_its_most_similar_sentence_above_the_threshold():
    # Sentence vectors: s0 = {base, flat}, s1 = {stem, clicks}, s2 = {shade, lock}.
    # img1 "shade" -> s2, cos 1/sqrt(2); img2 "the stem" -> s1, 1/sqrt(2); img3 "dial" -> 0 everywhere;
    # img4 "base stem" -> s0 and s1 tie at 1/2 (the first wins), dropped at threshold 0.6.
    example = _example(["the shade", "the stem", "a dial", "base stem"])
    assert rule_placements(example, ENCODER, threshold=0.6) == (Placement("img2", 1), Placement("img1", 2))
    assert rule_placements(example, ENCODER, threshold=0.4) == (
        Placement("img4", 0), Placement("img2", 1), Placement("img1", 2))
    assert rule_placements(example, ENCODER, threshold=0.8) == ()


def test_no_candidates_or_no_sentences():
    assert rule_placements(_example([]), ENCODER, threshold=0.0) == ()
    empty = InsertionExample("How?", "", _example(["the shade"]).candidates)
    assert rule_placements(empty, ENCODER, threshold=0.0) == ()
