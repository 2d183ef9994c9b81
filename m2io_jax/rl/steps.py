"""The trainer's device programs: vision features, log-probs, GRPO gradients and update, the SFT update.

Each is one jitted function of a static `StepSpec` (model graph and settings), the parameters (an `nnx.State`,
merged with the graph inside) and padded arrays, so a run compiles each program once per bucket, and trainers
with equal specs share the compilations. A GRPO update is exact over micro-batches: `grpo_gradients` adds each
micro-batch's unreduced loss sum, denominator and gradients to an `Accumulated`, `apply_gradients` divides once.
The updates donate the parameters and the optimizer state, compute in the configured dtype over master weights
(`optimizer.cast_floating`) and, on a mesh, give the new parameters the shardings of the old ones.

Vision features are computed once per step (`encode_vision`) and passed into the rollout, reference and
log-prob passes. When the optimizer's `param_rules` freeze the vision tower (`StepSpec.train_vision` False,
the usual choice) the updates take them as constants too: one tower execution per step. When any tower
parameter trains, the update recomputes the features from the prepared pixels inside its loss, so that the
gradient reaches the tower: one more tower forward and backward per update (per micro-batch).

`compile_count` counts the real XLA compilations of these programs (jax's backend-compile events, as
`m2io_jax.sampling.compiles` does for the sampler), not Python traces.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from m2io_jax import sharding as shd
from m2io_jax.models import lora
from m2io_jax.models.protocol import PreparedInputs
from m2io_jax.rl import grpo
from m2io_jax.rl.optimizer import FROZEN, build_optimizer, cast_floating, parameter_labels, parameter_path
from m2io_jax.sampling.compiles import CompileCounter

PROGRAMS = ("rl_init_optimizer", "rl_encode_vision", "rl_logprobs", "rl_reference_logprobs", "rl_grpo_gradients",
            "rl_apply_gradients", "rl_sft_update")
_COMPILES = CompileCounter({name: name for name in PROGRAMS})


def compile_count() -> int:
    """Number of trainer programs compiled in this process so far (all trainers together)."""
    return sum(_COMPILES.counts.values())


@struct.dataclass
class GrpoBatch:
    """One rollout in the training layout: R prompt rows, G completions each, N tokens."""

    inputs: PreparedInputs  # [R, P] prompts
    features: jax.Array | None  # [F, D] vision features of the prompts' images, or None
    completions: jax.Array  # [R, G, N] int32
    mask: jax.Array  # [R, G, N] float32
    advantages: jax.Array  # [R, G] float32
    truncated: jax.Array  # [R, G] bool
    row_mask: jax.Array  # [R] float32
    old_logp: jax.Array | None = None  # [R, G, N] (num_iterations > 1)
    ref_logp: jax.Array | None = None  # [R, G, N] (beta > 0)


@struct.dataclass
class SftBatch:
    """Target completions (G = 1) of R prompt rows, padded to N tokens."""

    inputs: PreparedInputs  # [R, P]
    features: jax.Array | None  # [F, D] or None
    targets: jax.Array  # [R, 1, N] int32
    mask: jax.Array  # [R, 1, N] float32


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a trainer's programs (hashable: trainers with equal specs share compilations).

    GRPO log-probs use the sampler's temperature, SFT temperature 1; both mask the sampler's suppressed tokens.
    grpo_items / optimizer_items: the config sections as sorted (key, value) items. param_shardings: the parameters'
    NamedShardings as flattened leaves (the updates give new parameters the same ones), or None off a mesh.
    """

    graphdef: Any
    temperature: float
    suppress_tokens: tuple[int, ...]
    compute_dtype: str
    train_vision: bool
    grpo_items: tuple[tuple[str, Any], ...]
    optimizer_items: tuple[tuple[str, Any], ...]
    param_shardings: tuple[Any, ...] | None
    adapters: bool = False  # LoRA: only the adapters train; the reference is the model with adapters off

    @classmethod
    def create(cls, graphdef: Any, params: nnx.State, *, temperature: float, suppress_tokens: Sequence[int],
               grpo_config: ml_collections.ConfigDict, optimizer_config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh | None, vision_parameters: str | None, adapters: bool = False) -> StepSpec:
        """The spec of a trainer over `params`. adapters: the model carries LoRA adapters (`models.lora`); then
        only they train, and `param_rules` (checked against every path) keep the rules that match an adapter."""
        shardings = None if mesh is None else tuple(x.sharding for x in jax.tree.leaves(params))
        return cls(graphdef=graphdef, temperature=float(temperature),
                   suppress_tokens=tuple(int(t) for t in suppress_tokens),
                   compute_dtype=str(optimizer_config.compute_dtype),
                   train_vision=not adapters and _trains(params, optimizer_config.param_rules, vision_parameters),
                   grpo_items=_items(grpo_config),
                   optimizer_items=_items(_adapter_rules(optimizer_config, params) if adapters else optimizer_config),
                   param_shardings=shardings, adapters=adapters)

    def grpo_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(self.grpo_items))

    def build_optimizer(self) -> optax.GradientTransformation:
        return build_optimizer(ml_collections.ConfigDict(dict(self.optimizer_items)))


def _trains(params: nnx.State, rules: Sequence[Any], prefix: str | None) -> bool:
    """Whether any parameter under the path `prefix` (e.g. "visual") is left trainable by the optimizer rules."""
    if prefix is None:
        return False
    labelled = jax.tree_util.tree_leaves_with_path(parameter_labels(params, rules))
    return any(label != FROZEN for path, label in labelled
               if parameter_path(path) == prefix or parameter_path(path).startswith(prefix + "/"))


def _adapter_rules(config: ml_collections.ConfigDict, params: nnx.State) -> ml_collections.ConfigDict:
    """`config` with the param_rules that match some adapter path (all are first checked against every path,
    so a misspelt rule still raises): with LoRA the optimizer sees only the adapters."""
    rules = tuple(config.param_rules)
    parameter_labels(params, rules)
    paths = [parameter_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(split_trainable(True, params)[0])]
    config = ml_collections.ConfigDict(config.to_dict())
    config.param_rules = tuple(r for r in rules if any(re.fullmatch(r[0], path) for path in paths))
    return config


def _is_adapter(path: tuple[Any, ...], _: Any) -> bool:
    return lora.is_adapter_path("/".join(str(p) for p in path))


def split_trainable(adapters: bool, params: nnx.State) -> tuple[nnx.State, nnx.State | None]:
    """(trainable, frozen) parts of `params`: the LoRA adapters and the rest when `adapters`, else (params, None).

    The trainable part is what gets gradients, optimizer state and (with LoRA) a checkpoint."""
    if not adapters:
        return params, None
    return nnx.split_state(params, _is_adapter, ...)


def join_trainable(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
    """The inverse of `split_trainable`."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def master_params(params: nnx.State, *, adapters: bool, optimizer: ml_collections.ConfigDict) -> nnx.State:
    """The trainer's own copy of `params`: the trainable part in `optimizer.param_dtype` (the master weights), a
    frozen LoRA base in `optimizer.compute_dtype` (it only ever enters the forward pass)."""
    trainable, frozen = split_trainable(adapters, params)
    return join_trainable(cast_floating(trainable, optimizer.param_dtype),
                          cast_floating(frozen, optimizer.compute_dtype))


def trainer_grpo_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config.grpo` with an unset max_completion_length taken from `config.rollout.max_new_tokens`."""
    grpo_config = ml_collections.ConfigDict(config.grpo.to_dict())
    if grpo_config.max_completion_length is None:
        grpo_config.max_completion_length = config.rollout.max_new_tokens
    return grpo_config


def _items(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    def frozen(value: Any) -> Any:
        return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

    return tuple(sorted((k, frozen(v)) for k, v in config.to_dict().items()))


def policy(spec: StepSpec, params: nnx.State) -> nnx.Module:
    """The model with `params` cast to the compute dtype."""
    return nnx.merge(spec.graphdef, cast_floating(params, spec.compute_dtype))


def _completion_logprobs(spec: StepSpec, params: nnx.State, inputs: PreparedInputs, features: jax.Array | None,
                         completions: jax.Array, temperature: float) -> jax.Array:
    """[R, G, N] float32 log-probs of `completions` [R, G, N] under `params` (the prompt run once)."""
    return policy(spec, params).completion_logprobs(inputs, completions, features, temperature=temperature,
                                                    suppress_tokens=spec.suppress_tokens)


def _trained_features(spec: StepSpec, params: nnx.State, inputs: PreparedInputs,
                      features: jax.Array | None) -> jax.Array | None:
    """The features an update differentiates through: recomputed from `params` when the tower trains."""
    if spec.train_vision and inputs.vision is not None:
        return policy(spec, params).encode_vision(inputs)
    return features


def _grad_norm(spec: StepSpec, grads: nnx.State) -> jax.Array:
    """Global norm of the gradients of the trainable parameters (what clipping sees)."""
    labels = parameter_labels(grads, dict(spec.optimizer_items)["param_rules"])
    return optax.global_norm(jax.tree.map(lambda g, label: g if label != FROZEN else jnp.zeros_like(g), grads, labels))


def _apply(spec: StepSpec, params: nnx.State, opt_state: Any, grads: nnx.State) -> tuple[nnx.State, Any]:
    """One optimizer step on the trainable part of `params` (`grads` is shaped like that part)."""
    trainable, frozen = split_trainable(spec.adapters, params)
    updates, opt_state = spec.build_optimizer().update(grads, opt_state, trainable)
    params = join_trainable(optax.apply_updates(trainable, updates), frozen)
    if spec.param_shardings is not None:
        shardings = jax.tree.unflatten(jax.tree.structure(params), spec.param_shardings)
        params = jax.lax.with_sharding_constraint(params, shardings)
    return params, opt_state


def _apply_if_finite(spec: StepSpec, params: nnx.State, opt_state: Any, grads: nnx.State,
                     metrics: dict[str, jax.Array]) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """`_apply`, unless the loss or the gradient norm is NaN or infinite: then the parameters and the optimizer
    state stay as they were (a select inside the program: the inputs are donated). Adds "skipped_nonfinite"
    (1 when skipped, else 0) to `metrics`."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_params, new_opt_state = _apply(spec, params, opt_state, grads)

    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(finite, new, old)

    params, opt_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)
    return params, opt_state, {**metrics, "skipped_nonfinite": 1.0 - finite.astype(jnp.float32)}


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def rl_init_optimizer(spec: StepSpec, params: nnx.State) -> Any:
    return spec.build_optimizer().init(split_trainable(spec.adapters, params)[0])


def rl_encode_vision(spec: StepSpec, params: nnx.State, inputs: PreparedInputs) -> jax.Array | None:
    return policy(spec, params).encode_vision(inputs)


def rl_logprobs(spec: StepSpec, params: nnx.State, inputs: PreparedInputs, features: jax.Array | None,
                completions: jax.Array) -> jax.Array:
    return _completion_logprobs(spec, params, inputs, features, completions, spec.temperature)


def rl_reference_logprobs(spec: StepSpec, params: nnx.State, inputs: PreparedInputs, features: jax.Array | None,
                          completions: jax.Array) -> jax.Array:
    """`rl_logprobs` of the LoRA reference policy: the same parameters with the adapters off (no second copy)."""
    model = lora.set_enabled(policy(spec, params), False)
    return model.completion_logprobs(inputs, completions, features, temperature=spec.temperature,
                                     suppress_tokens=spec.suppress_tokens)


@struct.dataclass
class Accumulated:
    """Sums over the micro-batches of one update: gradients of the unreduced loss sum, the sum itself, its
    denominator, and token-weighted diagnostics (exact accumulation: see `grpo.WeightedLoss`)."""

    grads: nnx.State
    total: jax.Array  # []
    denominator: jax.Array  # []
    clipped: jax.Array  # [] clip fraction * tokens
    kl: jax.Array  # [] mean k3 KL * tokens (0 when beta == 0)
    tokens: jax.Array  # [] completion tokens of the real rows


def zero_accumulated(params: nnx.State, adapters: bool = False) -> Accumulated:
    """Empty sums with gradients like the trainable part of `params` (same shardings)."""
    sums = [jnp.zeros((), jnp.float32) for _ in range(5)]  # distinct buffers: the accumulator is donated
    return Accumulated(jax.tree.map(jnp.zeros_like, split_trainable(adapters, params)[0]), *sums)


def micro_batches(batch: GrpoBatch, rows: int) -> list[GrpoBatch]:
    """`batch` split into consecutive slices of `rows` prompt rows (whole groups; R must divide by `rows`).

    Vision features stay whole: the image-token index of every row points into them.
    """
    total = batch.completions.shape[0]
    if rows <= 0 or rows >= total:
        return [batch]
    if total % rows:
        raise ValueError(f"{total} prompt rows do not split into micro-batches of {rows}; choose a divisor")

    def rows_of(x, start, axis=0):
        return None if x is None else jax.lax.slice_in_dim(x, start, start + rows, axis=axis)

    out = []
    for start in range(0, total, rows):
        inputs = batch.inputs.replace(
            ids=rows_of(batch.inputs.ids, start), mask=rows_of(batch.inputs.mask, start),
            positions=rows_of(batch.inputs.positions, start, axis=batch.inputs.positions.ndim - 2),
            next_position=rows_of(batch.inputs.next_position, start),
            image_index=rows_of(batch.inputs.image_index, start))
        out.append(batch.replace(
            inputs=inputs, completions=rows_of(batch.completions, start), mask=rows_of(batch.mask, start),
            advantages=rows_of(batch.advantages, start), truncated=rows_of(batch.truncated, start),
            row_mask=rows_of(batch.row_mask, start), old_logp=rows_of(batch.old_logp, start),
            ref_logp=rows_of(batch.ref_logp, start)))
    return out


def rl_grpo_gradients(spec: StepSpec, params: nnx.State, batch: GrpoBatch, accumulated: Accumulated,
                      ) -> tuple[Accumulated, jax.Array]:
    """Adds one micro-batch's GRPO loss sum, denominator and gradients to `accumulated` (donated); also returns
    the micro-batch's log-probs [R, G, N] under `params`."""
    r, g, n = batch.completions.shape

    def flat(x):
        return None if x is None else x.reshape(r * g, n)

    trainable, frozen = split_trainable(spec.adapters, params)

    def loss_fn(t):
        p = join_trainable(t, frozen)
        features = _trained_features(spec, p, batch.inputs, batch.features)
        logp = _completion_logprobs(spec, p, batch.inputs, features, batch.completions, spec.temperature)  # [R, G, N]
        weighted, diagnostics = grpo.grpo_loss(
            flat(logp), batch.advantages.reshape(r * g), flat(batch.mask), spec.grpo_config(),
            old_logp=flat(batch.old_logp), ref_logp=flat(batch.ref_logp), truncated=batch.truncated.reshape(r * g),
            row_mask=jnp.repeat(batch.row_mask, g))
        return weighted.total, (weighted.denominator, logp, diagnostics)

    (total, (denominator, logp, diagnostics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    tokens = jnp.sum(batch.mask * batch.row_mask[:, None, None])
    clipped = diagnostics["clip_fraction/low"] + diagnostics["clip_fraction/high"]
    kl = diagnostics.get("kl/mean", jnp.zeros((), jnp.float32))
    return Accumulated(
        grads=jax.tree.map(jnp.add, accumulated.grads, grads), total=accumulated.total + total,
        denominator=accumulated.denominator + denominator, clipped=accumulated.clipped + clipped * tokens,
        kl=accumulated.kl + kl * tokens, tokens=accumulated.tokens + tokens), logp


def rl_apply_gradients(spec: StepSpec, params: nnx.State, opt_state: Any, accumulated: Accumulated,
                       ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One optimizer step with the accumulated gradients over the summed denominator (the full batch's
    gradient); returns the loss, gradient norm, clip fraction, mean KL and skipped_nonfinite (the update skipped
    for a NaN or infinite loss or gradient: `_apply_if_finite`)."""
    denominator = jnp.maximum(accumulated.denominator, 1.0)
    grads = jax.tree.map(lambda x: x / denominator, accumulated.grads)
    tokens = jnp.maximum(accumulated.tokens, 1.0)
    metrics = {"loss": accumulated.total / denominator, "grad_norm": _grad_norm(spec, grads),
               "clip_fraction": accumulated.clipped / tokens, "kl": accumulated.kl / tokens}
    return _apply_if_finite(spec, params, opt_state, grads, metrics)


def rl_sft_update(spec: StepSpec, params: nnx.State, opt_state: Any, batch: SftBatch,
                  ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One optimizer step on the token-mean cross-entropy of the targets (log-probs at temperature 1), skipped
    when the loss or gradient is not finite (`_apply_if_finite`)."""

    trainable, frozen = split_trainable(spec.adapters, params)

    def loss_fn(t):
        p = join_trainable(t, frozen)
        features = _trained_features(spec, p, batch.inputs, batch.features)
        logp = _completion_logprobs(spec, p, batch.inputs, features, batch.targets, 1.0)  # [R, 1, N]
        return -_masked_mean(logp, batch.mask)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    metrics = {"loss": loss, "grad_norm": _grad_norm(spec, grads)}
    return _apply_if_finite(spec, params, opt_state, grads, metrics)


def optimizer_state_shardings(spec: StepSpec, params: nnx.State) -> Any:
    """Shardings of the optimizer state of `params` (sharded on a mesh): each moment shaped like a trainable
    parameter (its key path ends with the parameter's) takes that parameter's sharding, the rest (step counts)
    is replicated, so that the state never starts as a full copy on every device."""
    trainable = split_trainable(spec.adapters, params)[0]
    shardings = [(parameter_path(path), x.shape, x.sharding)
                 for path, x in jax.tree_util.tree_leaves_with_path(trainable)]
    replicated = NamedSharding(shardings[0][2].mesh, PartitionSpec())

    def pick(path: Any, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        name = parameter_path(path)
        for param_path, shape, sharding in shardings:
            if shape == leaf.shape and (name == param_path or name.endswith("/" + param_path)):
                return sharding
        return replicated

    abstract = jax.eval_shape(functools.partial(rl_init_optimizer, spec), params)
    return jax.tree_util.tree_map_with_path(pick, abstract)


def init_optimizer_program(spec: StepSpec, params: nnx.State) -> Any:
    """The jitted optimizer-state initialiser of `params` (concrete or abstract with shardings): on a mesh its
    outputs have `optimizer_state_shardings`, so the state is created in place, never replicated first."""
    out_shardings = None if spec.param_shardings is None else optimizer_state_shardings(spec, params)
    return shd.LockstepJit(rl_init_optimizer, static_argnums=0, out_shardings=out_shardings)


def init_optimizer(spec: StepSpec, params: nnx.State) -> Any:
    """The optimizer state of `params` (`init_optimizer_program`)."""
    return init_optimizer_program(spec, params)(spec, params)


encode_vision = shd.LockstepJit(rl_encode_vision, static_argnums=0)
logprobs = shd.LockstepJit(rl_logprobs, static_argnums=0)
reference_logprobs = shd.LockstepJit(rl_reference_logprobs, static_argnums=0)
grpo_gradients = shd.LockstepJit(rl_grpo_gradients, static_argnums=0, donate_argnums=(3,))
apply_gradients = shd.LockstepJit(rl_apply_gradients, static_argnums=0, donate_argnums=(1, 2))
sft_update = shd.LockstepJit(rl_sft_update, static_argnums=0, donate_argnums=(1, 2))
