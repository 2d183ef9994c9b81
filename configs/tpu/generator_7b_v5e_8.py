"""Serving the Qwen2.5-7B answer generator on a v5e-8 (TPU v5 lite, one host of 2x4 chips, 16 GiB per chip).

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/generator_7b_v5e_8.py

Topology "v5e:2x4", one host (chips_per_host_bounds (2, 4, 1)), 8 devices, one per chip. bfloat16 weights
(15.2 GB) split 4 ways by tensor parallelism (28 query heads, 4 KV heads, MLP 18944 and the vocabulary all
divide by 4; 8 would leave the heads replicated), 2 replicas on the fsdp axis, which the sampler's weight layout
drops (`sampling.sampling_rules`): on a `data` axis the weights stay sharded over it and every decode step
all-gathers them (measured: 477 all-gathers per step). 32 prompts of 4096 tokens (the retrieved passages),
512 new tokens each.
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config() -> ml_collections.ConfigDict:
    return BASE["generator_serving"]("v5e:2x4", chips_per_host_bounds=(2, 4, 1), mesh={"fsdp": 2, "tensor": 4},
                                     batch_size=32, prompt_length=4096, max_new_tokens=512)
