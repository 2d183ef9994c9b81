"""The 3B inserter's GRPO on a v5p-8 (TPU v5p, one host of 2x2x1 chips, 95 GiB HBM per chip, megacore).

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v5p_8.py

Like v4, a v5p chip's two TensorCores run as one megacore device; libtpu's "v5p:2x2x1" already reports the
VM's 4 devices (2 cores each). Mesh fsdp 2 x tensor 2 (a whole 8192-token prompt's update per device needs
about 59 GB of temporaries, see configs/tpu/inserter_3b_v6e_8.py); 16 prompts per step x G = 8, micro-batches
of 2 prompts, full fine-tuning.
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    return BASE["inserter_grpo"]("v5p:2x2x1", mesh={"fsdp": 2, "tensor": 2}, batch_size=16, micro_batch_prompts=2,
                                 checkpoint=checkpoint)
