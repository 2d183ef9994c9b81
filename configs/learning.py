"""The learning experiment: does GRPO add to SFT on the demo? (`python -m m2io_jax.experiments.learning`)

    python -m m2io_jax.experiments.learning --config=configs/learning.py --seeds=3 --out=/tmp/learning

The tiny run of `configs/tiny.py` (same model, prompts, rewards and optimizers), with:
  - the demo corpus generated at 3x its embedded size (`learning.corpus_scale`: 786 questions), split 75 / 10 /
    15 into train / validation / test, so that the test split holds over 100 questions and is used only for the
    table, while validation makes every choice (SFT plateau, checkpoints, the rule threshold);
  - SFT up to 600 steps, stopped at its validation plateau (`learning.patience` evaluations without a gain);
  - GRPO with beta = 0.04: the k3 KL to the SFT model is in the loss and in the diagnostics.
"""

import os
import runpy

import ml_collections

from m2io_jax.experiments import learning_config

# configs/ is not a package: the tiny run is loaded by path
TINY = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))


def get_config() -> ml_collections.ConfigDict:
    c = TINY["get_config"]()
    c.learning = learning_config.get_learning_config()
    c.data.split.validation = 0.1
    c.data.split.test = 0.15
    c.sft.num_steps = 600  # the cap (its learning rate decays over it); the plateau may stop SFT earlier
    c.grpo.beta = 0.04
    return c
