"""The default config of `python -m m2io_jax.train`: the sections of every package it wires together.

Each section is its package's own default (written once there); this module adds only what belongs to the
training run itself. The experiment configs of `configs/` (`tiny.py`, `inserter_3b.py`) build on it.

Sections:
  data       `m2io_jax.data.config` (data_dir, datasets, chunking, retrieval, candidates, split rule), plus
             source ("mramg": the reader on data_dir, "" = the demo corpus; "tfds": the builds under tfds_dir;
             `m2io_jax.inserter.sources`).
  inserter   `m2io_jax.inserter.config` (output format, think, captions, shuffle seed, reward weights).
  pipeline   `m2io_jax.inserter.pipeline.get_pipeline_config` (prompt budget and what happens over it).
  grpo, optimizer, rollout
             `m2io_jax.rl.config` (the GRPO stage's objective, optimizer and sampling), plus grpo.num_steps and
             grpo.batch_size (prompts per step, per process).
  sft        num_steps, batch_size and its own optimizer section (the SFT stage runs first; 0 steps skips it).
  model      checkpoint: a local Hugging Face Qwen2.5-VL directory; "" builds a tiny one into
             `{workdir}/init` with `model.tiny` (vocab_size, text_shape, vision_shape, min_pixels, max_pixels,
             seed), its tokenizer trained on the run's corpus and rendered completions. processor: keyword
             overrides of the image processor (e.g. max_pixels) for `Qwen2_5_VLProcessor.from_pretrained`.
             overrides: the model config's run-time fields by nested name (`models.from_pretrained(overrides=)`:
             dtype (the compute dtype of activations and matmuls), remat, attention_impl, ...), e.g.
             --config.model.overrides.text.attention_impl=pallas.
  eval       batch_size, max_new_tokens (greedy), max_examples (0 = the whole validation split),
             before_training (also evaluate the initial model, as stage "init"), rule_baseline (score the
             caption-similarity baseline, its threshold chosen on the validation split, as stage "rule").
  mesh       axis sizes of the (data, fsdp, tensor) mesh (`m2io_jax.sharding.make_mesh`); empty: one device.
  distributed  joining a multi-process run (`m2io_jax.sharding.get_distributed_config`): "auto" initializes
             jax.distributed on a multi-host TPU slice; every process runs the same steps on the same batches,
             the mesh spans all processes' devices, process 0 writes the files.
  profile    a jax.profiler trace of a window of steps into `{workdir}/profile` and per-step MFU / roofline
             figures (`m2io_jax.profiling.get_profile_config`; num_steps 0: no trace).
  checkpoint Orbax checkpoints in `{workdir}/checkpoints` (`m2io_jax.rl.checkpoint`): every_steps (run steps
             between saves; each stage's end and a preemption also save), keep (the newest N kept),
             asynchronous (write in the background while training goes on).
  lora       `m2io_jax.rl.config.get_lora_config` (rank 0 = off): adapters added for the GRPO stage only (the
             reference is then the SFT model, adapters off); the final checkpoint has them merged.
  seed; log_every (steps between metrics.jsonl and TensorBoard records, `{workdir}/tensorboard`) and
  print_every (between console progress lines); samples_every (GRPO steps between num_samples_logged sampled
  completions written as TensorBoard text; 0: never); max_nonfinite_in_a_row (a NaN or infinite loss skips its
  update; this many in a row stop the run);
  compilation_cache_dir (the persistent JAX compilation cache; "" turns it off).
"""

from __future__ import annotations

import ml_collections

from m2io_jax import profiling, sharding
from m2io_jax.data import config as data_config
from m2io_jax.inserter import config as inserter_config
from m2io_jax.inserter import pipeline
from m2io_jax.models import tiny
from m2io_jax.rl import config as rl_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.log_every = 1
    c.print_every = 10
    c.samples_every = 10
    c.num_samples_logged = 4
    c.max_nonfinite_in_a_row = 3
    c.compilation_cache_dir = "~/.cache/m2io_jax/jax_cache"

    c.data = data_config.get_config()
    c.data.source = "mramg"
    c.data.tfds_dir = ""

    c.inserter = inserter_config.get_inserter_config()
    c.pipeline = pipeline.get_pipeline_config()

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""
    c.model.processor = ml_collections.ConfigDict()
    c.model.overrides = ml_collections.ConfigDict()
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.vocab_size = 2048
    c.model.tiny.text_shape = dict(tiny.TEXT_SHAPE)
    c.model.tiny.vision_shape = dict(tiny.VISION_SHAPE)
    c.model.tiny.min_pixels = 56 * 56
    c.model.tiny.max_pixels = 112 * 112
    c.model.tiny.seed = 0

    c.sft = ml_collections.ConfigDict()
    c.sft.num_steps = 100
    c.sft.batch_size = 8
    c.sft.optimizer = rl_config.get_optimizer_config()

    trainer = rl_config.get_trainer_config()
    c.grpo = trainer.grpo
    c.grpo.num_steps = 100
    c.grpo.batch_size = 8
    c.optimizer = trainer.optimizer
    c.lora = rl_config.get_lora_config()
    c.rollout = trainer.rollout

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 32
    c.eval.max_examples = 0
    c.eval.before_training = True
    c.eval.rule_baseline = True

    c.mesh = ml_collections.ConfigDict()
    c.distributed = sharding.get_distributed_config()
    c.profile = profiling.get_profile_config()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.asynchronous = True
    return c
