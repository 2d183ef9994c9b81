"""BERT checkpoints in the Hugging Face layout (`BertModel`, `BertFor*`, sentence-transformers exports).

Loads into and saves from the flax.nnx network of `m2io_jax.models.bert` with `m2io_jax.models.hf` (numpy, never
torch; every tensor validated against the checkpoint header before an array is allocated). The tokenizer and the
sentence-transformers files around the weights are `m2io_jax.models.sentence_encoder`'s.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from m2io_jax.models import hf
from m2io_jax.models.bert import BertConfig, BertModel

CHECKPOINT_PREFIXES = ("", "bert.", "roberta.")  # sentence-transformers, BertModel/BertForX, RoBERTa exports


def tensor_specs(config: BertConfig) -> list[hf.TensorSpec]:
    """Every tensor of a Hugging Face `BertModel` checkpoint (names without prefix) and where it lives in ours.

    The pooler is optional: sentence-transformers exports drop it (sentence pooling never uses it), and it then
    loads as zeros.
    """
    d = config.hidden_size
    specs = [
        hf.TensorSpec(("embeddings", "word"), "embeddings.word_embeddings.weight", (config.vocab_size, d)),
        hf.TensorSpec(("embeddings", "position"), "embeddings.position_embeddings.weight",
                      (config.max_position_embeddings, d)),
        hf.TensorSpec(("embeddings", "token_type"), "embeddings.token_type_embeddings.weight",
                      (config.type_vocab_size, d)),
        hf.TensorSpec(("embeddings", "norm", "scale"), "embeddings.LayerNorm.weight", (d,)),
        hf.TensorSpec(("embeddings", "norm", "bias"), "embeddings.LayerNorm.bias", (d,)),
        hf.TensorSpec(("pooler", "kernel"), "pooler.dense.weight", (d, d), hf.transpose, hf.transpose, optional=True),
        hf.TensorSpec(("pooler", "bias"), "pooler.dense.bias", (d,), optional=True),
    ]
    for i in range(config.num_layers):
        specs += _layer_specs(config, i)
    return specs


def _layer_specs(config: BertConfig, i: int) -> list[hf.TensorSpec]:
    """The tensors of encoder layer `i` (`encoder.layer.{i}.*`, our `layers[i]`)."""
    d, f, h, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim

    def spec(ours: tuple[str, ...], hf_name: str, shape: tuple[int, ...], to_ours=hf.identity,
             to_hf=hf.identity) -> hf.TensorSpec:
        return hf.TensorSpec(("layers", str(i)) + ours, f"encoder.layer.{i}." + hf_name, shape, to_ours, to_hf)

    specs = []
    for proj in ("query", "key", "value"):
        specs += [
            spec(("attention", f"{proj}_kernel"), f"attention.self.{proj}.weight", (h * hd, d),
                 hf.split_heads_in(h, hd), hf.merge_heads_in),
            spec(("attention", f"{proj}_bias"), f"attention.self.{proj}.bias", (h * hd,),
                 hf.split_heads_bias(h, hd), hf.merge_heads_bias),
        ]
    return specs + [
        spec(("attention", "out_kernel"), "attention.output.dense.weight", (d, h * hd),
             hf.split_heads_out(h, hd), hf.merge_heads_out),
        spec(("attention", "out_bias"), "attention.output.dense.bias", (d,)),
        spec(("attention_norm", "scale"), "attention.output.LayerNorm.weight", (d,)),
        spec(("attention_norm", "bias"), "attention.output.LayerNorm.bias", (d,)),
        spec(("mlp_in_kernel",), "intermediate.dense.weight", (f, d), hf.transpose, hf.transpose),
        spec(("mlp_in_bias",), "intermediate.dense.bias", (f,)),
        spec(("mlp_out_kernel",), "output.dense.weight", (d, f), hf.transpose, hf.transpose),
        spec(("mlp_out_bias",), "output.dense.bias", (d,)),
        spec(("mlp_norm", "scale"), "output.LayerNorm.weight", (d,)),
        spec(("mlp_norm", "bias"), "output.LayerNorm.bias", (d,)),
    ]


def load_model(path: str, config: BertConfig, *, dtype: Any = jnp.float32, mesh: Any = None) -> BertModel:
    """Reads the safetensors weights in `path` into a `BertModel`.

    No torch and no random init: every tensor is validated against the checkpoint header before an array is
    allocated, then read straight into its shards. Keys may carry any of `CHECKPOINT_PREFIXES`.
    """
    return hf.load_model(path, lambda: BertModel(config, dtype=dtype, rngs=nnx.Rngs(0)), tensor_specs(config),
                         dtype=dtype, mesh=mesh, prefixes=CHECKPOINT_PREFIXES)


def save_model(model: BertModel, path: str) -> None:
    """Writes `config.json` and `model.safetensors` (float32, Hugging Face `BertModel` names) to `path`."""
    hf.save_checkpoint(model, tensor_specs(model.config), path, model.config.to_hf(), dtype=jnp.float32)
