"""The optax optimizer of the trainers, built from `m2io_jax.rl.config.get_optimizer_config()`.

AdamW with linear warmup then cosine decay to a floor, global-norm clipping over the trainable parameters,
and per-parameter rules by regex over the parameter path: "frozen" (no update and no optimizer state, so a
frozen vision tower costs no Adam moments) or a learning-rate multiplier. Works on any pytree of parameters,
including the `nnx.State` that `nnx.Optimizer(model, tx, wrt=nnx.Param)` hands to optax.

Mixed precision: master weights and optimizer state stay in the config's `param_dtype`; the loss function
casts them with `cast_floating(params, compute_dtype)`, whose gradient flows back in the master dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"


def parameter_path(keypath: Sequence[Any]) -> str:
    """The "/"-joined names of a jax key path, e.g. "visual/blocks/qkv" (an nnx Variable's `.value` dropped)."""
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(key))
    if names and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return "/".join(names)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine to learning_rate * min_learning_rate_ratio at
    total_steps, constant after."""
    if not 0 <= config.warmup_steps < config.total_steps:
        raise ValueError(f"optimizer config: need 0 <= warmup_steps < total_steps, got warmup_steps="
                         f"{config.warmup_steps}, total_steps={config.total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps, end_value=config.learning_rate * config.min_learning_rate_ratio)


def _parse_rules(rules: Sequence[Any]) -> list[tuple[re.Pattern, float | None]]:
    """(compiled regex, learning-rate multiplier or None for frozen) per rule, in order."""
    parsed = []
    for index, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"optimizer param_rules[{index}] = {rule!r}: expected (regex, 'frozen' or multiplier)")
        pattern, action = rule
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optimizer param_rules[{index}]: invalid regex {pattern!r}: {e}") from e
        if action == FROZEN:
            parsed.append((compiled, None))
        elif isinstance(action, (int, float)) and not isinstance(action, bool) and action >= 0:
            parsed.append((compiled, None if action == 0 else float(action)))
        else:
            raise ValueError(f"optimizer param_rules[{index}] for {pattern!r}: rule {action!r} is neither "
                             f"'{FROZEN}' nor a learning-rate multiplier >= 0")
    return parsed


def _label(multiplier: float | None) -> str:
    return FROZEN if multiplier is None else f"lr_x{multiplier!r}"


def parameter_labels(params: Any, rules: Sequence[Any]) -> Any:
    """A pytree like `params` whose leaves label each parameter "frozen" or "lr_x<multiplier>".

    Each path is matched with re.fullmatch against the rules in order; the first match wins, no match means
    multiplier 1.0. A rule that matches no parameter raises (a misspelt path would silently train everything).
    """
    parsed = _parse_rules(rules)
    used = [False] * len(parsed)

    def label(keypath, _):
        path = parameter_path(keypath)
        for index, (pattern, multiplier) in enumerate(parsed):
            if pattern.fullmatch(path):
                used[index] = True
                return _label(multiplier)
        return _label(1.0)

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [rules[i][0] for i, hit in enumerate(used) if not hit]
    if unused:
        examples = [parameter_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:5]]
        raise ValueError(f"optimizer param_rules {unused} match no parameter path (paths look like {examples})")
    return labels


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW + schedule + clipping + per-parameter rules from an optimizer config (see rl/config.py)."""
    rules = tuple(config.param_rules)
    parsed = _parse_rules(rules)
    schedule = learning_rate_schedule(config)

    def adamw(multiplier: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate=lambda step: multiplier * schedule(step), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay)

    multipliers = {1.0} | {m for _, m in parsed if m is not None}
    transforms = {_label(m): adamw(m) for m in multipliers}
    transforms[FROZEN] = optax.set_to_zero()

    def labels(params):
        return parameter_labels(params, rules)

    def trainable(params):
        return jax.tree.map(lambda label: label != FROZEN, labels(params))

    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.masked(optax.clip_by_global_norm(config.max_grad_norm), trainable))
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating-point array cast to `dtype` (integer and boolean leaves unchanged).

    Used inside the loss for bf16 compute over float32 master weights: the cast is differentiable, so the
    gradient arrives in the master dtype and the optimizer state never leaves it.
    """
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree)
