"""Deterministic train / validation / test split of an MRAMG-format dataset (our choice; MRAMG ships only a test set).

Rule:
  1. Questions that share a provenance document are joined (union-find over documents): a connected
     component is a set of documents together with every question citing any of them. No document is
     cited by questions of two splits.
  2. Each component gets the key `sha256("{salt}:{dataset}:{smallest document id}")`.
  The fractions and the salt form a `SplitRule`; its defaults are the `split` section of
  `m2io_jax.data.config` (`SplitRule.default()`).
  3. Components are visited in key order; each is put in `test` until test holds at least its fraction of
     the questions, then in `validation` likewise, and every remaining component in `train`; the last
     component goes to `train` if train would otherwise be empty.
  Documents no question cites belong to no split (`UNASSIGNED`): they stay in the retrieval corpus of every
  split. Filling by question count (rather than thresholding each hash) keeps the fractions close even when
  components are few and large (Manual: 40 documents for 390 questions).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import ml_collections

from m2io_jax.data import config as config_lib

SPLITS = ("train", "validation", "test")
UNASSIGNED = "none"


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Target fractions of questions in validation and test (train gets the rest), and the hash salt."""

    validation: float
    test: float
    salt: str

    def __post_init__(self):
        if self.validation < 0 or self.test < 0 or self.validation + self.test > 1:
            raise ValueError(f"split fractions validation={self.validation}, test={self.test}: need >= 0 and sum <= 1")

    @classmethod
    def from_config(cls, split: ml_collections.ConfigDict) -> "SplitRule":
        """The rule of a `split` config section (fields validation, test, salt)."""
        return cls(validation=split.validation, test=split.test, salt=split.salt)

    @classmethod
    def default(cls) -> "SplitRule":
        """The rule of the package's default config (`m2io_jax.data.config`)."""
        return cls.from_config(config_lib.get_config().split)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def assign_splits(
    dataset: str,
    question_provenance: Sequence[tuple[str, Sequence[str]]],
    rule: SplitRule | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Assigns questions and the documents they cite to splits.

    Args:
      dataset: dataset name (part of the hash key, so datasets split independently).
      question_provenance: (question id, provenance document ids) pairs. A question with no provenance forms
        its own component keyed by its id.
      rule: fractions and salt (None = `SplitRule.default()`); a new salt changes the whole assignment.

    Returns:
      (question id -> split, document id -> split) for every question and every cited document.
    """
    rule = rule or SplitRule.default()
    uf = _UnionFind()
    for qid, provenance in question_provenance:
        nodes = [f"d:{d}" for d in provenance] or [f"q:{qid}"]
        for node in nodes[1:]:
            uf.union(nodes[0], node)
        uf.find(nodes[0])
    components: dict[str, list[str]] = {}
    for qid, provenance in question_provenance:
        root = uf.find(f"d:{provenance[0]}" if provenance else f"q:{qid}")
        components.setdefault(root, []).append(qid)
    total = len(question_provenance)
    targets = (("test", rule.test * total), ("validation", rule.validation * total))

    def key(root: str) -> str:
        return hashlib.sha256(f"{rule.salt}:{dataset}:{root}".encode()).hexdigest()

    question_split: dict[str, str] = {}
    component_split: dict[str, str] = {}
    filled = {"test": 0, "validation": 0}
    stage = 0
    ordered = sorted(components, key=key)
    for position, root in enumerate(ordered):
        while stage < len(targets) and filled[targets[stage][0]] >= targets[stage][1]:
            stage += 1
        last = position == len(ordered) - 1
        no_train_yet = "train" not in component_split.values()
        split = targets[stage][0] if stage < len(targets) and not (last and no_train_yet) else "train"
        if split != "train":
            filled[split] += len(components[root])
        component_split[root] = split
        for qid in components[root]:
            question_split[qid] = split
    doc_split = {
        node[2:]: component_split[uf.find(node)]
        for node in list(uf.parent)
        if node.startswith("d:") and uf.find(node) in component_split
    }
    return question_split, doc_split
