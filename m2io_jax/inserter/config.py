"""The inserter task's knobs, in one ml_collections config: every default is written here once.

Fields:
  output_format: "anchors" (placements only, `<img3>@2`) or "inline" (the answer rewritten with `<imgN>`);
    see `m2io_jax.inserter.formats`.
  think: a `<think>...</think>` block before `<answer>` (off: the tiny config decodes few tokens).
  prompt.show_captions: show each candidate's caption next to its image (off: the captions-withheld
    experiment, where the inserter sees pixels only).
  shuffle_seed: seed of the per-question candidate shuffle (`m2io_jax.inserter.shuffle`).
  rewards.weights.{format, selection, order, placement, text}: weights of the reward components; the total
    is the weighted mean over the components that apply to an example (placement needs gold anchors, text
    preservation needs the inline format). Equal weights: the reference's section 3.2 default.
  rewards.gate_on_format: content rewards (all but format) count only when the format reward passes.
  rewards.placement_tolerance: a chosen gold image is well placed within this many sentences of its anchor.
  rule.threshold: the rule baseline keeps an image only when its caption's cosine similarity to its best
    sentence is above this (to be chosen on the validation split).
"""

from __future__ import annotations

import ml_collections


def get_inserter_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.output_format = "anchors"
    c.think = False

    c.prompt = ml_collections.ConfigDict()
    c.prompt.show_captions = True

    c.shuffle_seed = 0

    c.rewards = ml_collections.ConfigDict()
    c.rewards.weights = ml_collections.ConfigDict()
    c.rewards.weights.format = 1.0
    c.rewards.weights.selection = 1.0
    c.rewards.weights.order = 1.0
    c.rewards.weights.placement = 1.0
    c.rewards.weights.text = 1.0
    c.rewards.gate_on_format = True
    c.rewards.placement_tolerance = 1

    c.rule = ml_collections.ConfigDict()
    c.rule.threshold = 0.3
    return c
