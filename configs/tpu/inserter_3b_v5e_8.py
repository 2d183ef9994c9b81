"""The 3B inserter's GRPO on a v5e-8 (TPU v5 lite, one host of 2x4 chips, 16 GiB HBM per chip).

    JAX_PLATFORMS=cpu python -m m2io_jax.bench.aot --config=configs/tpu/inserter_3b_v5e_8.py
    python -m m2io_jax.train --config=configs/tpu/inserter_3b_v5e_8.py:/data/Qwen2.5-VL-3B-Instruct ...  (on the VM)

Topology "v5e:2x4" with chips_per_host_bounds (2, 4, 1): the one-host v5litepod-8 VM, 8 devices, one per chip
(v5e has one TensorCore per chip, so libtpu's topology and the VM agree). Mesh fsdp 2 x tensor 4: the
sampler's weight copy drops the fsdp axis (`sampling.sampling_rules`), so pure fsdp over 8 devices would hold
the whole bfloat16 model (7.5 GB) on every chip during the rollout; tensor 4 keeps a quarter. 8 prompts per
step x G = 8 at prompts of up to 8192 tokens (20 images of 448 px: 5120 vision tokens), 512 new tokens,
update micro-batches of 2 prompts, full remat, bfloat16 compute. LoRA (rank 16 on the decoder's projections,
base in bfloat16, vision tower frozen): full fine-tuning (float32 master weights, Adam, gradient accumulator,
reference copy) needs 22.4 GiB per chip in the compile report (11.6 GiB resident + 10.8 GiB of update
temporaries), over 0.9 x 16 GiB; LoRA's figures are in the README, "TPU compile report".
"""

import os
import runpy

import ml_collections

# configs/ is not a package: the shared builders are loaded by path
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(checkpoint: str = "Qwen2.5-VL-3B-Instruct") -> ml_collections.ConfigDict:
    return BASE["inserter_grpo"]("v5e:2x4", chips_per_host_bounds=(2, 4, 1), mesh={"fsdp": 2, "tensor": 4},
                                 batch_size=8, micro_batch_prompts=2, lora_rank=16, checkpoint=checkpoint)
