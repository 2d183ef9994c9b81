"""The 3B inserter's GRPO on a v4-8 (TPU v4, one host of 2x2x1 chips, 32 GiB HBM per chip, megacore).

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v4_8.py

A v4 chip has two TensorCores that a VM runs as one megacore device: a v4-8 VM has 4 devices of 32 GiB.
libtpu's default topology "v4:2x2x1" reports 8 devices (one per TensorCore, 16 GiB each); the report compiles
for the VM's layout (`chip_config_name="megacore"`, `m2io_jax.chips`): 4 devices. Mesh tensor 4: one prompt's
update per micro-batch, its heads and MLP split 4 ways (a whole 8192-token prompt per device needs about 59 GB of
temporaries, see configs/tpu/inserter_3b_v6e_8.py). LoRA (rank 16): float32 master weights, Adam and gradient
accumulator of the full model would take 15 of the 32 GiB per device on 4 devices before any activation.
8 prompts per step x G = 8, micro-batches of 1 prompt.
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    return BASE["inserter_grpo"]("v4:2x2x1", mesh={"tensor": 4}, batch_size=8, micro_batch_prompts=1, lora_rank=16,
                                 checkpoint=checkpoint)
