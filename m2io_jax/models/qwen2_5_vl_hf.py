"""Qwen2.5-VL checkpoints in the Hugging Face layout, loaded into and saved from our port.

The safetensors keys are the hub layout, which transformers 5.12 also writes: the language half under
`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head` (the Qwen2 mapping of `qwen2_hf`), the
vision tower under `visual.*` (patch_embed.proj, blocks.N.{norm1, norm2, attn.qkv, attn.proj,
mlp.gate_proj/up_proj/down_proj}, merger.{ln_q, mlp.0, mlp.2}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from m2io_jax.models import hf
from m2io_jax.models.overrides import override_fields
from m2io_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionConfig
from m2io_jax.models.qwen2_hf import check_load_dtype, text_tensor_specs


def vision_tensor_specs(config: VisionConfig, *, prefix: str = "visual.",
                        path_prefix: tuple[str, ...] = ("visual",)) -> list[hf.TensorSpec]:
    """The checkpoint layout of the vision tower (Conv3d and fused qkv reshaped to our matmul layouts)."""
    c = config
    d, f, h, hd, wide = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.hidden_size * c.merge_unit
    conv = (d, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)

    def spec(path: tuple[str, ...], name: str, shape, to_ours=hf.identity, to_hf=hf.identity) -> hf.TensorSpec:
        return hf.TensorSpec(path_prefix + path, prefix + name, tuple(shape), to_ours, to_hf)

    def block(name: str, hf_name: str, shape, to_ours=hf.identity, to_hf=hf.identity) -> hf.TensorSpec:
        """A weight of every block, stacked on our leading layer axis from `blocks.{layer}.*`."""
        return hf.TensorSpec(path_prefix + ("blocks", name), prefix + "blocks.{layer}." + hf_name, tuple(shape),
                             to_ours, to_hf, c.depth)

    specs = [
        spec(("patch_embed",), "patch_embed.proj.weight", conv, lambda w: w.reshape(d, -1).T,
             lambda w: w.T.reshape(conv)),
        block("norm1", "norm1.weight", (d,)),
        block("norm2", "norm2.weight", (d,)),
        block("qkv", "attn.qkv.weight", (3 * d, d), lambda w: w.T.reshape(d, 3, h, hd), lambda w: w.reshape(d, -1).T),
        block("qkv_bias", "attn.qkv.bias", (3 * d,), lambda b: b.reshape(3, h, hd), lambda b: b.reshape(-1)),
        block("proj", "attn.proj.weight", (d, d), hf.split_heads_out(h, hd), hf.merge_heads_out),
        block("proj_bias", "attn.proj.bias", (d,)),
        block("gate", "mlp.gate_proj.weight", (f, d), hf.transpose, hf.transpose),
        block("gate_bias", "mlp.gate_proj.bias", (f,)),
        block("up", "mlp.up_proj.weight", (f, d), hf.transpose, hf.transpose),
        block("up_bias", "mlp.up_proj.bias", (f,)),
        block("down", "mlp.down_proj.weight", (d, f), hf.transpose, hf.transpose),
        block("down_bias", "mlp.down_proj.bias", (d,)),
    ]
    specs += [
        spec(("merger", "ln_q"), "merger.ln_q.weight", (d,)),
        spec(("merger", "fc1"), "merger.mlp.0.weight", (wide, wide), hf.transpose, hf.transpose),
        spec(("merger", "fc1_bias"), "merger.mlp.0.bias", (wide,)),
        spec(("merger", "fc2"), "merger.mlp.2.weight", (c.out_hidden_size, wide), hf.transpose, hf.transpose),
        spec(("merger", "fc2_bias"), "merger.mlp.2.bias", (c.out_hidden_size,)),
    ]
    return specs


def tensor_specs(config: Qwen2_5_VLConfig) -> list[hf.TensorSpec]:
    """All checkpoint tensors of a Qwen2.5-VL model (language half + vision tower)."""
    return (text_tensor_specs(config.text, prefix="model.", lm_head="lm_head.weight", path_prefix=("language_model",))
            + vision_tensor_specs(config.vision))


def load_pretrained(path: str, config: dict[str, Any], *, dtype: Any = jnp.float32, mesh=None,
                    overrides: Mapping[str, Any] | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Loads a Qwen2.5-VL checkpoint directory (see `m2io_jax.models.from_pretrained`)."""
    check_load_dtype(dtype, path)
    cfg = Qwen2_5_VLConfig.from_hf(config, source=f"{path}/config.json", dtype=dtype)
    cfg = override_fields(cfg, overrides, f"{path}/config.json")
    return hf.load_model(path, lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)),
                         tensor_specs(cfg), dtype=dtype, mesh=mesh)


def save_pretrained(model: Qwen2_5_VLForConditionalGeneration, path: str, *,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` so that `transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` loads it."""
    cfg = model.config
    hf.save_checkpoint(model, tensor_specs(cfg), path, cfg.to_hf(), max_shard_bytes=max_shard_bytes)
