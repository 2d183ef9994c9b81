"""BERTScore (Zhang et al., 2020) computed with our Flax BERT encoder, without torch.

For each candidate/reference pair: token embeddings of one encoder layer (special tokens included), each
L2-normalised; precision = weighted mean over candidate tokens of the best cosine with any reference token,
recall = the same from the reference side, F1 = 2PR / (P + R). Weights follow the `bert_score` package:
without idf every token weighs 1 except [CLS]/[SEP] (0); with idf a token weighs log((M + 1) / (df + 1)) over
the M references (so [CLS]/[SEP], present everywhere, weigh 0). An empty candidate or reference scores 0.
Optional baseline rescaling maps a score s to (s - b) / (1 - b).

MRAMG-Bench reports BERTScore F1 with roberta-large; this repository defaults to the encoder it already ships
(MiniLM, last layer), so absolute values are not comparable with the paper's, only between our systems.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np

from m2io_jax.models.sentence_encoder import SentenceEncoder


def idf_weights(references: Sequence[Sequence[int]]) -> collections.defaultdict[int, float]:
    """Token id -> log((M + 1) / (df + 1)), df = number of the M references containing the token."""
    counts = collections.Counter(token for ids in references for token in set(ids))
    m = len(references)
    weights = collections.defaultdict(lambda: math.log(m + 1))
    weights.update({token: math.log((m + 1) / (c + 1)) for token, c in counts.items()})
    return weights


def _special_ids(encoder: SentenceEncoder) -> set[int]:
    ids = (encoder.tokenizer.token_to_id("[CLS]"), encoder.tokenizer.token_to_id("[SEP]"))
    return {i for i in ids if i is not None}


def _greedy_match(cand: np.ndarray, ref: np.ndarray, w_cand: np.ndarray, w_ref: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of token embeddings cand [Tc, D] vs ref [Tr, D] under token weights."""
    cand = cand / np.linalg.norm(cand, axis=1, keepdims=True)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    sim = cand @ ref.T  # [Tc, Tr]
    precision = float(np.dot(sim.max(axis=1), w_cand) / w_cand.sum())
    recall = float(np.dot(sim.max(axis=0), w_ref) / w_ref.sum())
    return precision, recall


def bert_score(
    candidates: Sequence[str],
    references: Sequence[str],
    encoder: SentenceEncoder,
    *,
    layer: int | None = None,
    idf: bool = False,
    baseline: tuple[float, float, float] | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERTScore precision, recall and F1 [N] of candidates[i] against references[i].

    Args:
      candidates, references: N texts each.
      encoder: the Flax BERT `SentenceEncoder` whose hidden states are compared.
      layer: hidden states after this layer (default: the last; `bert_score`'s `num_layers`).
      idf: weight tokens by inverse document frequency over `references`.
      baseline: (P, R, F) baseline values to rescale with; None leaves scores raw.
      batch_size: texts per encoder call.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        empty = np.zeros(0, np.float64)
        return empty, empty, empty
    unique = list(dict.fromkeys([*candidates, *references]))
    states, token_ids = encoder.token_embeddings(unique, layer=layer, batch_size=batch_size)
    position = {text: i for i, text in enumerate(unique)}
    specials = _special_ids(encoder)
    if idf:
        weights = idf_weights([token_ids[position[r]] for r in references])
    else:
        weights = collections.defaultdict(lambda: 1.0, {token: 0.0 for token in specials})
    scores = np.zeros((len(candidates), 3), np.float64)
    for row, (cand, ref) in enumerate(zip(candidates, references)):
        c, r = position[cand], position[ref]
        if len(token_ids[c]) <= 2 or len(token_ids[r]) <= 2:  # only [CLS] [SEP]: an empty text scores 0
            continue
        w_c = np.array([weights[t] for t in token_ids[c]])
        w_r = np.array([weights[t] for t in token_ids[r]])
        if w_c.sum() == 0 or w_r.sum() == 0:  # every token weighs 0 (idf): undefined, scored 0 as bert_score does
            continue
        precision, recall = _greedy_match(states[c], states[r], w_c, w_r)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
        scores[row] = precision, recall, f1
    if baseline is not None:
        scores = (scores - np.asarray(baseline)) / (1.0 - np.asarray(baseline))
    return scores[:, 0], scores[:, 1], scores[:, 2]
