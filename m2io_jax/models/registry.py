"""One dispatch table from a checkpoint's `model_type` to the module that loads and saves it.

Entries are import paths, so that loading a text encoder does not import the vision tower and vice versa.
Each module named here provides `load_pretrained(path, config_dict, *, dtype, mesh, overrides)` and
`save_pretrained(model, path)`, and its model classes carry a `model_type` class attribute.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

_MODULES: dict[str, str] = {
    "qwen2": "m2io_jax.models.qwen2_hf",
    "qwen2_5_vl": "m2io_jax.models.qwen2_5_vl_hf",
    "bert": "m2io_jax.models.sentence_encoder",
}


def supported_model_types() -> tuple[str, ...]:
    """The `model_type` values `from_pretrained` accepts."""
    return tuple(sorted(_MODULES))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads `config.json` of a checkpoint directory, with errors that name the file."""
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {os.fspath(path)!r} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: missing config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_path}: no 'model_type' key; expected one of {supported_model_types()}")
    return config


def _module_for(model_type: str, where: str):
    if model_type not in _MODULES:
        raise ValueError(f"{where}: unsupported model_type {model_type!r}; supported: {supported_model_types()}")
    return importlib.import_module(_MODULES[model_type])


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Any = None,
                    overrides: Mapping[str, Any] | None = None):
    """Loads the model stored in a local Hugging Face checkpoint directory.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded checkpoint with
        `model.safetensors.index.json`).
      dtype: parameter and compute dtype (float32 or bfloat16).
      mesh: a `jax.sharding.Mesh`; parameters are placed straight into their shards on it. None: one device.
      overrides: fields of our model config that the checkpoint does not hold, by dotted name: how to run the
        model, e.g. `{"remat": "full"}` for Qwen2, `{"text.remat": "full", "vision.remat": "full",
        "vision.full_attention_block_scores": 1 << 28}` for Qwen2.5-VL
        (see `m2io_jax.models.overrides.override_fields`).
    """
    config = read_config(path)
    module = _module_for(config["model_type"], os.path.join(os.fspath(path), "config.json"))
    return module.load_pretrained(os.fspath(path), config, dtype=dtype, mesh=mesh, overrides=overrides)


def save_pretrained(model: Any, path: str | os.PathLike) -> None:
    """Writes `model` as a Hugging Face checkpoint directory that transformers loads."""
    model_type = getattr(model, "model_type", None)
    module = _module_for(model_type, type(model).__name__)
    module.save_pretrained(model, os.fspath(path))
