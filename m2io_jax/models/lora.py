"""LoRA adapters on the Qwen2 decoder's projections (stacked layers), for light-memory fine-tuning.

Our own rather than qwix: qwix swaps flax Linear/Einsum modules for LoRA ones, but our decoder keeps every
layer's weights stacked on a leading `layers` axis and runs plain einsums on them inside `lax.scan`
(`qwen2.project`), so there is no per-projection module for qwix to intercept.

For each targeted projection W [L, *in, *out] the adapters hold A [L, *in, r] (random) and B [L, r, *out]
(zeros, so a fresh adapter changes nothing), as `nnx.Param`s carrying logical axes, under the path
`.../layers/lora/<name>_a` and `..._b`. The forward adds (alpha / r) * (x @ A) @ B to x @ W (`qwen2.project`); no
merged copy of W is ever made, so the sampler and the trainer share the base weights.

  apply(model, rank=, alpha=, target=)  attaches adapters to every Qwen2 decoder in `model` (in place)
  has_adapters(model)                   whether any are attached
  set_enabled(model, flag)              adapters on or off (off: exactly the base model; the GRPO reference)
  is_adapter_path(path)                 which parameter paths are adapters (the trainable part)
  merge(model)                          a plain model whose weights are W + (alpha / r) A @ B (for export)
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from m2io_jax.models.layers import param
from m2io_jax.models.qwen2 import DecoderLayers
from m2io_jax.sharding import variable_logical_axes

ADAPTER_NAME = "lora"
"""The attribute holding a decoder's adapters: every adapter parameter's path contains it."""

PROJECTION_INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                         "down_proj": 1}
"""Projections that can carry adapters and how many of their dimensions (after `layers`) are inputs."""

DEFAULT_TARGET = r"(q|k|v|o|gate|up|down)_proj$"


class LoraAdapters(nnx.Module):
    """Factors A [L, *in, r] and B [L, r, *out] for the projections `names` of one `DecoderLayers`.

    `scale` (alpha / rank) and `enabled` are static attributes; `stacked` hands the factors to the scan with the
    scale folded into B, or nothing when disabled.
    """

    def __init__(self, layers: DecoderLayers, names: list[str], *, rank: int, alpha: float, rngs: nnx.Rngs):
        self.names = tuple(names)
        self.rank = rank
        self.scale = alpha / rank
        self.enabled = True
        for name in names:
            weight = getattr(layers, name)
            axes = variable_logical_axes(weight)
            shape = weight[...].shape
            split = 1 + PROJECTION_INPUT_DIMS[name]
            fan_in = math.prod(shape[1:split])
            dtype = weight[...].dtype
            setattr(self, f"{name}_a", param(rngs, (*shape[:split], rank), (*axes[:split], None), dtype,
                                             std=1.0 / math.sqrt(fan_in)))
            setattr(self, f"{name}_b", param(rngs, (shape[0], rank, *shape[split:]), (axes[0], None, *axes[split:]),
                                             dtype, init="zeros"))

    def stacked(self, dtype: Any) -> dict[str, jax.Array]:
        """{"<name>/lora_a": A, "<name>/lora_b": scale * B} in `dtype`, or {} when disabled."""
        if not self.enabled:
            return {}
        out = {}
        for name in self.names:
            out[f"{name}/lora_a"] = getattr(self, f"{name}_a")[...].astype(dtype)
            out[f"{name}/lora_b"] = (self.scale * getattr(self, f"{name}_b")[...]).astype(dtype)
        return out


def _decoders(model: nnx.Module) -> list[tuple[str, DecoderLayers]]:
    """("/"-joined path, module) of every Qwen2 decoder stack in `model`."""
    return [("/".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, DecoderLayers)]


def apply(model: nnx.Module, *, rank: int, alpha: float, target: str = DEFAULT_TARGET, seed: int = 0) -> nnx.Module:
    """Attaches rank-`rank` adapters (B = 0) to the projections whose path ("language_model/layers/q_proj")
    matches `target` (re.search) in every Qwen2 decoder of `model`; returns `model`, changed in place.

    Raises ValueError for rank < 1, a model without a Qwen2 decoder, a target matching no projection, or a
    model that already has adapters.
    """
    if rank < 1:
        raise ValueError(f"lora.apply: rank must be >= 1, got {rank} (rank 0 means no LoRA: do not call apply)")
    decoders = _decoders(model)
    if not decoders:
        raise ValueError(f"lora.apply: {type(model).__name__} has no Qwen2 decoder (DecoderLayers) to adapt")
    pattern = re.compile(target)
    rngs = nnx.Rngs(params=seed)
    for path, layers in decoders:
        if layers.lora is not None:
            raise ValueError(f"lora.apply: the decoder at {path!r} already has adapters")
        prefix = f"{path}/" if path else ""
        names = [n for n in PROJECTION_INPUT_DIMS if pattern.search(f"{prefix}{n}")]
        if not names:
            raise ValueError(f"lora.apply: target {target!r} matches none of the projections "
                             f"{[prefix + n for n in PROJECTION_INPUT_DIMS]}")
        layers.lora = LoraAdapters(layers, names, rank=rank, alpha=alpha, rngs=rngs)
    return model


def apply_config(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
    """`apply` with a config's `rank`, `alpha`, `target` and `seed` (rank 0: `model` unchanged, no adapters)."""
    if config.rank == 0:
        return model
    return apply(model, rank=int(config.rank), alpha=float(config.alpha), target=str(config.target),
                 seed=int(config.seed))


def has_adapters(model: nnx.Module) -> bool:
    """Whether any decoder of `model` carries adapters."""
    return any(layers.lora is not None for _, layers in _decoders(model))


def set_enabled(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Turns every adapter of `model` on or off (off: the forward is exactly the base model's); returns `model`."""
    for _, layers in _decoders(model):
        if layers.lora is not None:
            layers.lora.enabled = enabled
    return model


def is_adapter_path(path: str) -> bool:
    """Whether a "/"-joined parameter path names an adapter factor (the part LoRA trains and checkpoints)."""
    return ADAPTER_NAME in path.split("/")


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of `model` without adapters whose projections are W + scale * A @ B (computed in float32, stored in
    W's dtype): its forward equals the adapted forward. Adapters that are disabled are dropped unmerged.
    `model` itself is unchanged."""
    merged = nnx.merge(*nnx.split(model))  # new modules; the variables stay shared until replaced below
    for _, layers in _decoders(merged):
        adapters = layers.lora
        if adapters is None:
            continue
        if adapters.enabled:
            for name in adapters.names:
                weight = getattr(layers, name)
                a = getattr(adapters, f"{name}_a")[...].astype(jnp.float32)  # [L, *in, r]
                b = getattr(adapters, f"{name}_b")[...].astype(jnp.float32)  # [L, r, *out]
                delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                                   b.reshape(b.shape[0], b.shape[1], -1))  # [L, in, out]
                base = weight[...]
                merged_weight = base.astype(jnp.float32) + adapters.scale * delta.reshape(base.shape)
                # a new variable, so that `model` keeps its W
                setattr(layers, name, weight.replace(merged_weight.astype(base.dtype)))
        layers.lora = None
    return merged
