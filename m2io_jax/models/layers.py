"""Building blocks shared by every model in this package: parameter creation and the attention mask value.

One home for each, so that the Qwen2 decoder, the Qwen2.5-VL vision tower and the BERT encoder initialise
and mask the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MASKED_SCORE = float(jnp.finfo(jnp.float32).min)
"""The attention score given to a masked key (finite, so a row whose keys are all masked stays NaN-free)."""

_INITS = ("normal", "truncated_normal", "zeros", "ones")


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any, *,
          init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter of `shape` in `dtype` carrying its logical axis names (`sharding.py` maps them to a mesh).

    init: "normal" (std `std`), "truncated_normal" (std `std`, cut at 2 std), "zeros" or "ones". Random values
    are drawn in float32 and cast, so a bfloat16 model starts from the rounded float32 draw.
    """
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {shape} needs one logical axis name per dimension; got {axes}")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "truncated_normal":
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"param init must be one of {_INITS}; got {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=axes)
