"""The knobs of the learning experiment (`m2io_jax.experiments.learning`), its config's `learning` section.

Fields:
  corpus_scale: the demo corpus is generated at this scale into `{out}/corpus_x{scale}` (`m2io_jax.data.demo.build`,
    1..3; 1 is the embedded corpus), so that the test split holds enough questions and train keeps most of
    them. Used only when `config.data.data_dir` is "" (the demo); a real data_dir is read as it is.
  min_test_questions: the experiment stops before training when the test split has fewer questions.
  eval_every: training steps between greedy evaluations on the validation split (every arm).
  patience, min_delta: the SFT plateau: SFT stops after `patience` evaluations in a row whose validation
    `select_metric` did not beat the best so far by more than `min_delta`, or at `config.sft.num_steps`.
  select_metric: the validation metric of every choice: the SFT plateau, the checkpoint of the continued-SFT
    and GRPO arms (their best evaluation after step 0) and the rule baseline's threshold (by reward).
  continued_sft_batch_size: gold targets per step of the continued-SFT arm; 0: the batch that puts about as
    many tokens through the update per step as a GRPO step (`learning.continued_batch_size`).
  format_seeds: the inline-format arms (SFT and GRPO) run for the first this many seeds.
"""

from __future__ import annotations

import ml_collections


def get_learning_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.corpus_scale = 3
    c.min_test_questions = 100
    c.eval_every = 50
    c.patience = 6
    c.min_delta = 0.005
    c.select_metric = "reward"
    c.continued_sft_batch_size = 0
    c.format_seeds = 1
    return c
