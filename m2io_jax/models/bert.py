"""BERT-family text encoder network in flax.nnx: the retrieval embedder and the BERTScore backbone.

This module is the network only. Its Hugging Face checkpoint layout (tensor names, load and save) is
`m2io_jax.models.bert_hf`; tokenizer, sentence-transformers pooling and the `load_encoder` entry point are
`m2io_jax.models.sentence_encoder`. Every parameter carries logical axis names for `m2io_jax.sharding`.

Architecture (Devlin et al.; Hugging Face `BertModel`): word + absolute position + token-type embeddings,
LayerNorm, then post-LN layers `x = LN(x + Attn(x)); x = LN(x + FFN(x))` with GELU, padding masked out of
attention with `layers.MASKED_SCORE`.

XLM-RoBERTa / BGE-M3 fit with small changes, all outside the layer stack:
  1. position ids start after the padding index and skip pads: `position_ids = cumsum(mask) * mask + pad_id`
     (pass them to `BertModel.__call__`, which accepts `position_ids`);
  2. `type_vocab_size` is 1 (token types stay all zero, so row 0 is still added, as in Hugging Face);
  3. tensor names carry a `roberta.` prefix instead of `bert.` (`bert_hf.load_model` accepts both) and the
     registry needs an `xlm-roberta` entry pointing to `bert_hf`;
  4. BGE-M3 pools with CLS and allows 8192 tokens: both come from its sentence-transformers files already.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from m2io_jax.models.layers import MASKED_SCORE, param

MODEL_TYPE = "bert"
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; field names are ours, `from_hf`/`to_hf` translate Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any], where: str = "config.json") -> BertConfig:
        """Reads a Hugging Face BERT config dict; `where` names the file in error messages."""
        keys = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
        }
        missing = [hf for hf in keys.values() if hf not in config]
        if missing:
            raise ValueError(f"{where}: missing BERT keys {missing}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{where}: position_embedding_type={config['position_embedding_type']!r}; only 'absolute' is supported"
            )
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act={act!r}; supported: {sorted(_ACTIVATIONS)}")
        out = cls(
            **{ours: int(config[hf]) for ours, hf in keys.items()},
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            pad_token_id=int(config.get("pad_token_id") or 0),
        )
        if out.hidden_size % out.num_heads:
            raise ValueError(
                f"{where}: hidden_size {out.hidden_size} is not divisible by num_attention_heads {out.num_heads}"
            )
        return out

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict (transformers `BertModel`)."""
        return {
            "architectures": ["BertModel"],
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("encoder_embed",), dtype, init="ones")
        self.bias = param(rngs, (dim,), ("encoder_embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Embeddings(nnx.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        d = config.hidden_size
        self.word = param(rngs, (config.vocab_size, d), ("encoder_vocab", "encoder_embed"), dtype)
        self.position = param(rngs, (config.max_position_embeddings, d), (None, "encoder_embed"), dtype)
        self.token_type = param(rngs, (config.type_vocab_size, d), (None, "encoder_embed"), dtype)
        self.norm = LayerNorm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, position_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        x = self.word[...][ids] + self.position[...][position_ids] + self.token_type[...][token_type_ids]
        return self.norm(x)  # [B, T, D]


# Layout of q, k, v and the context by sequence length. From HEADS_MAJOR_MIN_LENGTH tokens on, heads-major
# [B, H, T, Dh]: XLA:CPU runs the batched score and context products 1.2x (128 tokens) to 1.7x (256 tokens) faster
# per forward than tokens-major [B, T, H, Dh]. Below it the attention products are small and the transposes into
# and out of heads-major cost more than they save: tokens-major is 11% faster at 16 tokens and 5% at 24 (MiniLM,
# one AMD EPYC Zen 5 core, AVX-512; equal at 32 and 64). Einsums: projection, scores, context, output projection.
HEADS_MAJOR_MIN_LENGTH = 32
_ATTENTION_EINSUMS = {
    True: ("btd,dhk->bhtk", "bhqk,bhtk->bhqt", "bhqt,bhtk->bhqk", "bhtk,hkd->btd"),
    False: ("btd,dhk->bthk", "bqhk,bthk->bhqt", "bhqt,bthk->bqhk", "bthk,hkd->btd"),
}


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with separate Q/K/V projections ([D, H, Dh] kernels)."""

    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, h, hd = config.hidden_size, config.num_heads, config.head_dim
        for name in ("query", "key", "value"):
            kernel_axes = ("encoder_embed", "encoder_heads", "head_dim")
            setattr(self, f"{name}_kernel", param(rngs, (d, h, hd), kernel_axes, dtype))
            setattr(self, f"{name}_bias", param(rngs, (h, hd), ("encoder_heads", "head_dim"), dtype, init="zeros"))
        self.out_kernel = param(rngs, (h, hd, d), ("encoder_heads", "head_dim", "encoder_embed"), dtype)
        self.out_bias = param(rngs, (d,), ("encoder_embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array, attention_bias: jax.Array) -> jax.Array:
        # The 1/sqrt(Dh) scale is folded into q (one pass less over the [B, H, T, T] scores).
        heads_major = x.shape[1] >= HEADS_MAJOR_MIN_LENGTH
        project, scores, mix, merge = _ATTENTION_EINSUMS[heads_major]

        def projection(kernel: nnx.Param, bias: nnx.Param) -> jax.Array:
            return jnp.einsum(project, x, kernel[...]) + (bias[...][:, None] if heads_major else bias[...])

        scale = 1.0 / math.sqrt(self.query_kernel.shape[-1])
        q = projection(self.query_kernel, self.query_bias) * scale  # [B, H, T, Dh] or [B, T, H, Dh]
        k = projection(self.key_kernel, self.key_bias)
        v = projection(self.value_kernel, self.value_bias)
        logits = jnp.einsum(scores, q, k).astype(jnp.float32)  # [B, H, T, T]
        probs = jax.nn.softmax(logits + attention_bias, axis=-1).astype(x.dtype)
        context = jnp.einsum(mix, probs, v)
        return jnp.einsum(merge, context, self.out_kernel[...]) + self.out_bias[...]


class Layer(nnx.Module):
    """One post-LN transformer layer: attention block then GELU feed-forward block."""

    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.activation = config.hidden_act
        self.attention = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.attention_norm = LayerNorm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp_in_kernel = param(rngs, (d, f), ("encoder_embed", "encoder_mlp"), dtype)
        self.mlp_in_bias = param(rngs, (f,), ("encoder_mlp",), dtype, init="zeros")
        self.mlp_out_kernel = param(rngs, (f, d), ("encoder_mlp", "encoder_embed"), dtype)
        self.mlp_out_bias = param(rngs, (d,), ("encoder_embed",), dtype, init="zeros")
        self.mlp_norm = LayerNorm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, attention_bias: jax.Array) -> jax.Array:
        x = self.attention_norm(x + self.attention(x, attention_bias))
        hidden = _ACTIVATIONS[self.activation](x @ self.mlp_in_kernel[...] + self.mlp_in_bias[...])  # [B, T, F]
        return self.mlp_norm(x + hidden @ self.mlp_out_kernel[...] + self.mlp_out_bias[...])


class Pooler(nnx.Module):
    """The weights of Hugging Face `BertPooler` (tanh(dense(h[:, 0]))), held so that checkpoints round-trip.

    Sentence pooling (mean / CLS / max over the hidden states) never applies them, so there is no `__call__`.
    """

    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        d = config.hidden_size
        self.kernel = param(rngs, (d, d), ("encoder_embed", None), dtype)
        self.bias = param(rngs, (d,), (None,), dtype, init="zeros")


class BertModel(nnx.Module):
    """The BERT network: `model(ids, mask)` -> hidden states [B, T, D] after `num_layers` layers (all by default)."""

    model_type = MODEL_TYPE

    def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Layer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.pooler = Pooler(config, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        ids: jax.Array,
        mask: jax.Array,
        *,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        num_layers: int | None = None,
    ) -> jax.Array:
        """Hidden states [B, T, D] of `ids` [B, T] (mask [B, T]: 1 = token, 0 = padding).

        `num_layers=k` stops after layer k (0: the embedding output), as Hugging Face `hidden_states[k]`.
        """
        batch, length = ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        attention_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, MASKED_SCORE)  # [B, 1, 1, T]
        x = self.embeddings(ids, position_ids, token_type_ids)
        stop = len(self.layers) if num_layers is None else num_layers
        for layer in self.layers[:stop]:
            x = layer(x, attention_bias)
        return x
