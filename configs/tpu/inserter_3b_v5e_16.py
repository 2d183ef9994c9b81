"""The 3B inserter's GRPO on a v5e-16 (TPU v5 lite, 4 hosts of 2x2 chips, 16 GiB HBM per chip): multi-host.

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v5e_16.py

Topology "v5e:4x4" with libtpu's default hosts of 2x2x1 chips: 16 devices (one per chip) over 4 processes,
as the v5litepod-16 VM's 4 workers run them (`config.distributed` "auto" joins them). Mesh fsdp 4 x tensor 4.
grpo.batch_size is per host: 2 prompts per host, 8 per step, x G = 8; update micro-batches of 4 prompts
(one per fsdp shard); LoRA rank 16 as on the v5e-8 (each device runs the same update temporaries, about 11 GiB
with full fine-tuning's vision tower, on top of 6.5 GiB of full fine-tuning's state); the rest as
configs/tpu/inserter_3b_v5e_8.py.
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    return BASE["inserter_grpo"]("v5e:4x4", mesh={"fsdp": 4, "tensor": 4}, batch_size=2, micro_batch_prompts=4,
                                 lora_rank=16, checkpoint=checkpoint)
