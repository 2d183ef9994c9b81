"""The inserter of M2IO-R1: Qwen2.5-VL-3B-Instruct, SFT then GRPO on MRAMG-Bench, for a TPU slice.

    python -m m2io_jax.data.tfds_builder --data_dir=/data/tfds --manual_dir=/data/MRAMG-Bench \
        --builder_config=recipe_qa --builder_config=recipe_corpus ...    # each dataset's qa and corpus builds
    python -m m2io_jax.train --config=configs/inserter_3b.py:/data/Qwen2.5-VL-3B-Instruct \
        --config.data.tfds_dir=/data/tfds --workdir=/data/runs/inserter_3b

The text after `:` is the local Hugging Face checkpoint directory (default `Qwen2.5-VL-3B-Instruct`). Data:
MRAMG-Bench's six datasets from the TFDS builds under `data.tfds_dir` (the split rule is the builds'), top-10
retrieval, at most 20 candidates, images at most 256 vision tokens each (max_pixels), prompts within 8192
tokens (longer ones lose their lowest-ranked candidates, counted in data.json). Parameters are sharded over
every device on `fsdp`; float32 master weights, bfloat16 compute. The vision tower trains at a tenth of the
learning rate. GRPO settings are the reference's section 3.2 defaults (G = 8, beta = 0.04, epsilon = 0.2,
learning rate 1e-6, temperature 1); anchors format with `<think>`.
"""

import ml_collections

from m2io_jax import systems, train_config
from m2io_jax.data import mramg

VISION = (r"visual/.*", 0.1)


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    c = train_config.get_config()
    c.systems = systems.get_systems_config()  # answer / evaluate --system: checkpoints, generator, batches
    c.model.checkpoint = checkpoint
    c.model.processor.max_pixels = 256 * 28 * 28
    c.mesh.fsdp = -1

    c.data.source = "tfds"
    c.data.tfds_dir = "tensorflow_datasets"
    c.data.datasets = mramg.DATASETS
    c.pipeline.max_prompt_tokens = 8192
    c.inserter.output_format = "anchors"
    c.inserter.think = True

    c.sft.num_steps = 200
    c.sft.batch_size = 32
    c.sft.optimizer.learning_rate = 1e-5
    c.sft.optimizer.total_steps = c.sft.get_ref("num_steps")  # follows --config.sft.num_steps
    c.sft.optimizer.param_rules = (VISION,)

    c.grpo.num_steps = 500
    c.grpo.batch_size = 32
    c.grpo.num_generations = 8
    c.grpo.beta = 0.04
    c.optimizer.total_steps = c.grpo.get_ref("num_steps")
    c.optimizer.param_rules = (VISION,)
    c.rollout.max_new_tokens = 512

    c.eval.batch_size = 64
    c.eval.max_new_tokens = 512
    return c
