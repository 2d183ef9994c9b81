"""The CPU demo of the whole method: a tiny Qwen2.5-VL inserter, SFT then GRPO, on the embedded demo corpus.

    python -m m2io_jax.train --config=configs/tiny.py --workdir=/tmp/tiny_run

The model is built at run time (`m2io_jax.models.tiny`): a byte-level BPE tokenizer trained on the demo corpus,
the prompt text and rendered completions (vocabulary ~1.7K), a 2-layer decoder of width 64 and a 2-block vision
tower: 0.27M parameters. The vision tower (merger included, 84K parameters) is frozen: its random features
still tell the images apart, and the captions carry the content. Anchors format, no `<think>`, captions shown,
top-3 chunks, at most 6 candidates, prompts within 512 tokens. SFT 500 steps of 8 prompts, then GRPO 300
steps of 8 prompts x 8 samples; 5.5 minutes on the 2-core CPU (README, Training).
"""

import ml_collections

from m2io_jax import systems, train_config


def get_config() -> ml_collections.ConfigDict:
    c = train_config.get_config()
    c.systems = systems.get_systems_config()  # answer / evaluate --system: checkpoints, generator, batches
    c.data.retrieval.top_k = 3
    c.data.candidates.max_images = 6
    c.pipeline.max_prompt_tokens = 512
    c.inserter.output_format = "anchors"
    c.inserter.think = False
    c.print_every = 25

    c.sft.num_steps = 500
    c.sft.batch_size = 8
    c.sft.optimizer.learning_rate = 3e-3
    c.sft.optimizer.warmup_steps = 20
    c.sft.optimizer.total_steps = c.sft.get_ref("num_steps")  # follows --config.sft.num_steps
    c.sft.optimizer.param_rules = ((r"visual/.*", "frozen"),)
    c.sft.optimizer.compute_dtype = "float32"

    c.grpo.num_steps = 300
    c.grpo.batch_size = 8
    c.grpo.num_generations = 8
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.total_steps = c.grpo.get_ref("num_steps")
    c.optimizer.param_rules = ((r"visual/.*", "frozen"),)
    c.optimizer.compute_dtype = "float32"
    c.rollout.max_new_tokens = 32  # four placements and the tags take ~27 tokens
    c.rollout.prompt_lengths = (c.pipeline.max_prompt_tokens,)  # one prompt bucket: one compile per program
    c.rollout.temperature = 1.0

    c.eval.batch_size = 16
    c.eval.max_new_tokens = 32
    return c
