"""Shared by the TPU configs of this folder: the model shapes and the two config builders (not a config itself).

The shapes are the published Hugging Face config.json dictionaries (what `m2io_jax.bench.aot` builds abstractly
from, with no checkpoint): Qwen2.5-VL-3B-Instruct, the inserter, and Qwen2.5-7B-Instruct, the generator.

Every TPU config has a `tpu` section, read by `python -m m2io_jax.bench.aot` and ignored by training:
  topology               `get_topology_desc` name, e.g. "v5e:2x4" (the chip is its prefix, `m2io_jax.chips`)
  chips_per_host_bounds  chips per host as the VM has them, e.g. (2, 4, 1) for the one-host v5e-8; () keeps
                         libtpu's default (hosts of 2x2x1 chips)
  model                  the model's Hugging Face config dictionary (shapes only)
  program                "grpo" (the inserter's GRPO step) or "sample" (serving: prefill and decode)
  prompt_length          the prompt bucket compiled (the largest the run uses)
  images_per_prompt, image_grid   images per prompt and their patch grid (t, h, w) (Qwen2.5-VL only)
  batch_size, num_samples, max_new_tokens   the serving batch ("sample" configs; GRPO takes them from
                         grpo.batch_size (per host), grpo.num_generations and rollout.max_new_tokens)
and a `model.overrides` section: the model config's run-time fields (compute dtype, remat, attention_impl, the
vision tower's score budget) by nested name, e.g. --config.model.overrides.text.attention_impl=pallas.
"""

import importlib.util
import os

import ml_collections

QWEN2_5_VL_3B = {
    "model_type": "qwen2_5_vl", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
    "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 128000, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
}

QWEN2_5_7B = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
}

IMAGE_GRID = (1, 32, 32)
"""448 x 448 pixels in 14-pixel patches: 1024 patches, 256 vision tokens (inserter_3b's max_pixels)."""


def _inserter_3b(checkpoint: str) -> ml_collections.ConfigDict:
    """`get_config(checkpoint)` of configs/inserter_3b.py (configs/ is not a package: loaded by path)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inserter_3b.py")
    spec = importlib.util.spec_from_file_location("inserter_3b_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(checkpoint)


def _tpu(topology: str, chips_per_host_bounds: tuple[int, ...], model: dict, program: str,
         prompt_length: int) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.topology = topology
    t.chips_per_host_bounds = chips_per_host_bounds
    t.model = model
    t.program = program
    t.prompt_length = prompt_length
    t.images_per_prompt = 0
    t.image_grid = IMAGE_GRID
    t.batch_size = 0
    t.num_samples = 1
    t.max_new_tokens = 0
    return t


def inserter_grpo(topology: str, *, chips_per_host_bounds: tuple[int, ...] = (), mesh: dict,
                  batch_size: int, micro_batch_prompts: int, lora_rank: int = 0, remat: str = "full",
                  prompt_length: int = 8192, images_per_prompt: int = 20,
                  checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    """configs/inserter_3b.py (G = 8, beta 0.04, 512 new tokens, vision tower at a tenth of the learning rate)
    sized for a slice: its mesh, prompts per host per step, the update's micro-batch, LoRA rank (0: full
    fine-tuning), bfloat16 compute with float32 master weights, remat of decoder and tower, prompt buckets up to
    `prompt_length` (compiled at the largest, with `images_per_prompt` 448-px images each). `checkpoint`: the
    local Hugging Face directory training loads (the compile report needs none)."""
    c = _inserter_3b(checkpoint)
    c.mesh = mesh
    c.grpo.batch_size = batch_size
    c.rollout.micro_batch_prompts = micro_batch_prompts
    c.rollout.prompt_lengths = tuple(b for b in (1024, 2048, 4096, 8192) if b < prompt_length) + (prompt_length,)
    c.pipeline.max_prompt_tokens = prompt_length
    c.lora.rank = lora_rank
    c.optimizer.param_dtype = "float32"
    c.optimizer.compute_dtype = "bfloat16"
    c.model.overrides = ml_collections.ConfigDict({
        "text": {"dtype": "bfloat16", "remat": remat, "attention_impl": "xla"},
        "vision": {"dtype": "bfloat16", "remat": remat, "full_attention_block_scores": 1 << 28}})
    c.tpu = _tpu(topology, chips_per_host_bounds, QWEN2_5_VL_3B, "grpo", prompt_length)
    c.tpu.images_per_prompt = images_per_prompt
    return c


def generator_serving(topology: str, *, chips_per_host_bounds: tuple[int, ...] = (), mesh: dict,
                      batch_size: int, prompt_length: int, max_new_tokens: int) -> ml_collections.ConfigDict:
    """Serving Qwen2.5-7B as the answer generator: the sampler's prefill and decode in bfloat16 (weights too),
    `batch_size` prompts of `prompt_length` tokens (the retrieved passages), one greedy answer each."""
    c = ml_collections.ConfigDict()
    c.mesh = mesh
    c.model = ml_collections.ConfigDict()
    c.model.overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "param_dtype": "bfloat16",
                                                   "attention_impl": "xla"})
    c.tpu = _tpu(topology, chips_per_host_bounds, QWEN2_5_7B, "sample", prompt_length)
    c.tpu.batch_size = batch_size
    c.tpu.max_new_tokens = max_new_tokens
    return c
