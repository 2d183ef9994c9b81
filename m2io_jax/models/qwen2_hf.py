"""Qwen2 checkpoints in the Hugging Face layout (`Qwen2ForCausalLM`), loaded into and saved from our port.

`text_tensor_specs` is also used by the Qwen2.5-VL port for its language half (with other key prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from m2io_jax.models import hf
from m2io_jax.models.overrides import override_fields
from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


def text_tensor_specs(
    config: Qwen2Config, *, prefix: str = "model.", lm_head: str = "lm_head.weight",
    path_prefix: tuple[str, ...] = (),
) -> list[hf.TensorSpec]:
    """The checkpoint layout of a Qwen2 decoder: `{prefix}embed_tokens.weight`, `{prefix}layers.{i}.*`, ...

    Args:
      config: the model shape.
      prefix: key prefix of the decoder in the checkpoint ("model." for Qwen2ForCausalLM).
      lm_head: name of the untied output projection.
      path_prefix: where the Qwen2ForCausalLM sits inside the state of a larger model.
    """
    c = config
    d, f, h, kv, hd, n = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                          c.head_dim, c.num_hidden_layers)
    layer = prefix + "layers.{layer}."

    def stacked(name: str, hf_name: str, hf_shape, to_ours=hf.identity, to_hf=hf.identity) -> hf.TensorSpec:
        return hf.TensorSpec(path_prefix + ("layers", name), layer + hf_name, tuple(hf_shape), to_ours, to_hf, n)

    specs = [
        hf.TensorSpec(path_prefix + ("embed_tokens",), prefix + "embed_tokens.weight", (c.vocab_size, d)),
        hf.TensorSpec(path_prefix + ("norm",), prefix + "norm.weight", (d,)),
        stacked("input_norm", "input_layernorm.weight", (d,)),
        stacked("post_norm", "post_attention_layernorm.weight", (d,)),
        stacked("q_proj", "self_attn.q_proj.weight", (h * hd, d), hf.split_heads_in(h, hd), hf.merge_heads_in),
        stacked("k_proj", "self_attn.k_proj.weight", (kv * hd, d), hf.split_heads_in(kv, hd), hf.merge_heads_in),
        stacked("v_proj", "self_attn.v_proj.weight", (kv * hd, d), hf.split_heads_in(kv, hd), hf.merge_heads_in),
        stacked("q_bias", "self_attn.q_proj.bias", (h * hd,), hf.split_heads_bias(h, hd), hf.merge_heads_bias),
        stacked("k_bias", "self_attn.k_proj.bias", (kv * hd,), hf.split_heads_bias(kv, hd), hf.merge_heads_bias),
        stacked("v_bias", "self_attn.v_proj.bias", (kv * hd,), hf.split_heads_bias(kv, hd), hf.merge_heads_bias),
        stacked("o_proj", "self_attn.o_proj.weight", (d, h * hd), hf.split_heads_out(h, hd), hf.merge_heads_out),
        stacked("gate_proj", "mlp.gate_proj.weight", (f, d), hf.transpose, hf.transpose),
        stacked("up_proj", "mlp.up_proj.weight", (f, d), hf.transpose, hf.transpose),
        stacked("down_proj", "mlp.down_proj.weight", (d, f), hf.transpose, hf.transpose),
    ]
    if not c.tie_word_embeddings:
        specs.append(hf.TensorSpec(path_prefix + ("lm_head",), lm_head, (c.vocab_size, d), hf.transpose, hf.transpose))
    return specs


def load_pretrained(path: str, config: dict[str, Any], *, dtype: Any = jnp.float32, mesh=None,
                    overrides: Mapping[str, Any] | None = None) -> Qwen2ForCausalLM:
    """Loads a Qwen2ForCausalLM checkpoint directory into `Qwen2ForCausalLM` (see `m2io_jax.models.from_pretrained`)."""
    check_load_dtype(dtype, path)
    cfg = Qwen2Config.from_hf(config, source=f"{path}/config.json", dtype=dtype, param_dtype=dtype)
    cfg = override_fields(cfg, overrides, f"{path}/config.json")
    return hf.load_model(path, lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), text_tensor_specs(cfg),
                         dtype=dtype, mesh=mesh)


def save_pretrained(model: Qwen2ForCausalLM, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` so that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it."""
    cfg = model.config
    hf.save_checkpoint(model, text_tensor_specs(cfg), path, cfg.to_hf(), max_shard_bytes=max_shard_bytes)


def check_load_dtype(dtype: Any, path: str) -> None:
    """Raises naming the checkpoint when parameters cannot be loaded as `dtype` (floating types only)."""
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise TypeError(f"{path}: cannot load parameters as dtype {name}; expected float32, bfloat16 or float16")
