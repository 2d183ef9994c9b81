"""The `rule` baseline: each candidate goes after the answer sentence most similar to its caption.

Similarity is the cosine between sentence-encoder embeddings (the retrieval encoder in practice: anything with
`.encode(texts) -> [N, D]` L2-normalised rows). A candidate is kept only when its best similarity is above
`config.rule.threshold`, which is chosen on the validation split. No training, no images: it shows what
captions alone achieve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from m2io_jax.inserter.example import InsertionExample
from m2io_jax.inserter.formats import Placement


class SentenceEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised embeddings of `texts`."""


def rule_placements(example: InsertionExample, encoder: SentenceEncoder, *, threshold: float) -> tuple[Placement, ...]:
    """Placements of the candidates whose caption is more similar than `threshold` to some answer sentence.

    Each kept candidate follows its most similar sentence (the first on ties). Placements come in the order of
    the inline text (by sentence, then by candidate id order).
    """
    sentences = list(example.sentences)
    ids = example.candidate_ids
    if not sentences or not ids:
        return ()
    embeddings = np.asarray(encoder.encode(sentences + list(example.candidates.captions)), np.float32)
    if embeddings.shape[0] != len(sentences) + len(ids):
        raise ValueError(
            f"encoder returned {embeddings.shape[0]} embeddings for {len(sentences)} sentences and {len(ids)} "
            f"captions; expected one row per text"
        )
    similarity = embeddings[len(sentences):] @ embeddings[: len(sentences)].T  # [K, S]
    best = similarity.argmax(axis=1)  # [K]
    kept = [
        Placement(image, int(best[k])) for k, image in enumerate(ids) if similarity[k, best[k]] > threshold
    ]
    return tuple(sorted(kept, key=lambda placement: placement.sentence))
