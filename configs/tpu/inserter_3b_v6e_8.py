"""The 3B inserter's GRPO on a v6e-8 (TPU v6e Trillium, one host of 2x4 chips, 32 GiB HBM per chip).

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v6e_8.py

Topology "v6e:2x4" with chips_per_host_bounds (2, 4, 1): the one-host v6e-8 VM, 8 devices, one per chip (one
TensorCore each). Mesh fsdp 2 x tensor 4: with fsdp 8 each device runs a whole 8192-token prompt's update
alone, and the compiler refuses it (59 GB of temporaries against 31.25 GB of HBM); tensor 4 splits its heads and
MLP. 16 prompts per step x G = 8, micro-batches of 2 prompts, full fine-tuning.
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    return BASE["inserter_grpo"]("v6e:2x4", chips_per_host_bounds=(2, 4, 1), mesh={"fsdp": 2, "tensor": 4},
                                 batch_size=16, micro_batch_prompts=2, checkpoint=checkpoint)
