"""Rewards of one inserter completion: pure functions of the decoded text and the example.

Components, each in [0, 1]:
  format     1 when the completion follows the format with no problem (tags, every id a candidate, no
             duplicates, sentence numbers in range; `formats.parse_completion`), else 0.
  selection  image F1 of the placed images against the gold ids (`metrics.image_scores`).
  order      MRAMG image ordering score of the placed images, in the order of the inline text
             (`metrics.ordering_score`).
  placement  the fraction of chosen gold images placed within `placement_tolerance` sentences of their gold
             anchor (ordering alone rewards putting every image at the end). Left out when the example's
             gold anchors are unknown (counted as `placement_unknown`). For `inline`, sentences are those of
             the completion's own text (the text reward checks that it is the input's).
  text       `inline` only: 1 when the answer without its placeholders equals the input answer (whitespace
             normalised), else 0.

Both formats are scored on the same inline text. The total is the weighted mean over the components that
apply, so leaving one out renormalises the others' weights. With `gate_on_format`, content components are 0
when the format fails. A completion that does not parse scores format 0 and is flagged `parse_failed`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import ml_collections

from m2io_jax.eval import metrics
from m2io_jax.inserter import formats
from m2io_jax.inserter.example import InsertionExample

FORMAT, SELECTION, ORDER, PLACEMENT, TEXT = "format", "selection", "order", "placement", "text"
COMPONENTS = (FORMAT, SELECTION, ORDER, PLACEMENT, TEXT)


@dataclasses.dataclass(frozen=True)
class Reward:
    """The reward of one completion.

    Attributes:
      total: weighted mean of `components`.
      components: the score of each component that applies to the example (placement and text may be absent).
      parse_failed: the completion does not follow the format's grammar.
      placement_unknown: placement was left out because the example's gold anchors are unknown.
      problems: what the parser found wrong.
    """

    total: float
    components: dict[str, float]
    parse_failed: bool
    placement_unknown: bool
    problems: tuple[formats.Problem, ...]


def format_reward(parsed: formats.ParsedCompletion) -> float:
    return 1.0 if parsed.well_formed else 0.0


def selection_reward(gold: Sequence[str], predicted: Sequence[str]) -> float:
    return metrics.image_scores(gold, predicted)[2]


def order_reward(gold: Sequence[str], predicted: Sequence[str]) -> float:
    return metrics.ordering_score(gold, predicted)


def placement_reward(
    placements: Sequence[formats.Placement], gold_anchors: Sequence[formats.Placement], *, tolerance: int
) -> float:
    """Fraction of the chosen gold images (first placement of each) within `tolerance` sentences of their anchor.

    No gold image chosen: 1 when there is no gold image and nothing was placed, else 0.
    """
    anchor = {gold.image: gold.sentence for gold in gold_anchors}
    chosen: dict[str, int] = {}
    for placement in placements:
        if placement.image in anchor:
            chosen.setdefault(placement.image, placement.sentence)
    if not chosen:
        return 1.0 if not anchor and not placements else 0.0
    hits = sum(abs(sentence - anchor[image]) <= tolerance for image, sentence in chosen.items())
    return hits / len(chosen)


def text_reward(inline_text: str, answer: str) -> float:
    """1 when `inline_text` without its `<imgN>` placeholders is `answer` (whitespace runs compared as one)."""
    return 1.0 if metrics.strip_image_markers(inline_text).split() == answer.split() else 0.0


def score_completion(completion: str, example: InsertionExample, config: ml_collections.ConfigDict) -> Reward:
    """The reward of `completion` for `example` under the inserter `config` (`get_inserter_config()` fields)."""
    output_format = formats.check_format(config.output_format)
    parsed = formats.parse_completion(
        completion,
        output_format=output_format,
        think=config.think,
        answer=example.answer,
        candidate_ids=example.candidate_ids,
    )
    predicted = parsed.images
    components = {
        FORMAT: format_reward(parsed),
        SELECTION: selection_reward(example.gold, predicted),
        ORDER: order_reward(example.gold, predicted),
    }
    if example.gold_anchors is not None:
        components[PLACEMENT] = placement_reward(
            parsed.placements, example.gold_anchors, tolerance=config.rewards.placement_tolerance
        )
    if output_format == formats.INLINE:
        components[TEXT] = text_reward(parsed.inline_text, example.answer)
    if config.rewards.gate_on_format and components[FORMAT] == 0.0:
        components = {name: (value if name == FORMAT else 0.0) for name, value in components.items()}
    return Reward(
        total=weighted_mean(components, config.rewards.weights),
        components=components,
        parse_failed=parsed.parse_failed,
        placement_unknown=example.gold_anchors is None,
        problems=parsed.problems,
    )


def weighted_mean(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Σ w_c r_c / Σ w_c over the components present; raises when their weights are missing or sum to <= 0."""
    missing = [name for name in components if name not in weights]
    if missing:
        raise ValueError(f"rewards.weights has no weight for {missing}; expected one for each of {COMPONENTS}")
    total_weight = math.fsum(weights[name] for name in components)
    if total_weight <= 0:
        raise ValueError(
            f"rewards.weights of {sorted(components)} sum to {total_weight}; expected a positive sum"
        )
    return math.fsum(weights[name] * value for name, value in components.items()) / total_weight


def summarize(rewards: Sequence[Reward]) -> dict[str, float]:
    """Log metrics of a batch: `reward/mean`, the mean of each component over the completions it applies to
    (`reward/<component>`), and the counts `count/parse_failed`, `count/format_failed`, `count/placement_unknown`.
    """
    if not rewards:
        raise ValueError("summarize: no rewards given; expected at least one completion's reward")
    out = {"reward/mean": math.fsum(r.total for r in rewards) / len(rewards)}
    for name in COMPONENTS:
        values = [r.components[name] for r in rewards if name in r.components]
        if values:
            out[f"reward/{name}"] = math.fsum(values) / len(values)
    out["count/parse_failed"] = float(sum(r.parse_failed for r in rewards))
    out["count/format_failed"] = float(sum(r.components[FORMAT] == 0.0 for r in rewards))
    out["count/placement_unknown"] = float(sum(r.placement_unknown for r in rewards))
    return out
