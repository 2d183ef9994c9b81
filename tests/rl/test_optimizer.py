"""The optimizer builder: schedule values by hand, frozen and scaled parameters by regex, clipping, bf16 compute."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m2io_jax.rl import optimizer
from m2io_jax.rl.config import get_optimizer_config


def _config(**overrides):
    config = get_optimizer_config()
    config.update(overrides)
    return config


def test_schedule_at_chosen_steps():
    schedule = optimizer.learning_rate_schedule(
        _config(learning_rate=1e-3, warmup_steps=10, total_steps=110, min_learning_rate_ratio=0.1))
    # Warmup 0 -> 1e-3 over 10 steps; then 1e-4 + 9e-4 * (1 + cos(pi * (s - 10) / 100)) / 2; 1e-4 after step 110.
    hand = {0: 0.0, 5: 5e-4, 10: 1e-3, 35: 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, 60: 5.5e-4,
            110: 1e-4, 500: 1e-4}
    np.testing.assert_allclose([schedule(s) for s in hand], list(hand.values()), rtol=1e-6)


class Tower(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(3, 4, rngs=rngs)


class TinyModel(nnx.Module):
    """A vision-like submodule `visual` and a text head, with parameter paths like the real models'."""

    def __init__(self, rngs: nnx.Rngs):
        self.visual = Tower(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.visual.proj(x)))


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


def _train(config, steps=3):
    model = TinyModel(nnx.Rngs(0))
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, optimizer.build_optimizer(config), wrt=nnx.Param)
    x = jnp.arange(15.0).reshape(5, 3) / 10
    for _ in range(steps):
        opt.update(model, nnx.grad(_loss)(model, x))
    return before, nnx.state(model, nnx.Param), opt


def _delta(before, after, *path):
    """after - before of the parameter at `path` (e.g. "head", "kernel")."""
    for key in path:
        before, after = before[key], after[key]
    return np.asarray(after.value) - np.asarray(before.value)


@pytest.mark.parametrize("rule", ["frozen", 0.0])
def test_frozen_parameters_stay_bit_identical(rule):
    config = _config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, param_rules=((r"visual/.*", rule),))
    before, after, opt = _train(config)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(after["visual"]["proj"][leaf].value, before["visual"]["proj"][leaf].value)
        assert np.abs(_delta(before, after, "head", leaf)).max() > 1e-4
    # A frozen parameter holds no Adam moments.
    adam_leaves = [x for x in jax.tree.leaves(opt.opt_state) if getattr(x, "shape", None) == (3, 4)]
    assert not adam_leaves


def test_multiplier_scales_the_update():
    params = {"visual": {"proj": jnp.linspace(-1.0, 1.0, 6)}, "head": jnp.linspace(0.5, 2.0, 4)}
    grads = {"visual": {"proj": jnp.linspace(0.3, -0.2, 6)}, "head": jnp.linspace(-1.0, 0.4, 4)}
    base = dict(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)

    def updates(config):
        tx = optimizer.build_optimizer(config)
        state = tx.init(params)
        for _ in range(2):
            out, state = tx.update(grads, state, params)
        return out

    full = updates(_config(**base))
    scaled = updates(_config(**base, param_rules=((r"visual/.*", 0.1),)))
    # AdamW's step and its decoupled weight decay both scale with the learning rate.
    np.testing.assert_allclose(scaled["visual"]["proj"], 0.1 * full["visual"]["proj"], rtol=1e-6)
    np.testing.assert_allclose(scaled["head"], full["head"], rtol=1e-6)
    assert np.abs(full["visual"]["proj"]).min() > 1e-4


def test_first_matching_rule_wins():
    params = {"visual": {"proj": jnp.zeros(2), "norm": jnp.zeros(2)}, "head": jnp.zeros(2)}
    labels = optimizer.parameter_labels(params, ((r"visual/norm", 0.5), (r"visual/.*", "frozen")))
    assert labels == {"visual": {"proj": "frozen", "norm": "lr_x0.5"}, "head": "lr_x1.0"}


def _first_moments(state):
    """Every Adam first moment in an optax state, flattened and concatenated."""
    found = optax.tree_utils.tree_get_all_with_path(state, "mu")
    return jnp.concatenate([x.reshape(-1) for _, mu in found for x in jax.tree.leaves(mu)])


def test_clipping_bounds_the_global_norm_of_trainable_gradients():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(4), "visual": jnp.zeros(2)}
    config = _config(max_grad_norm=1.0, b1=0.9, param_rules=((r"visual", "frozen"),))
    tx = optimizer.build_optimizer(config)
    # Trainable gradient norm sqrt(9 * 3 + 16 * 4) = sqrt(91); after clipping mu = (1 - b1) * g / |g|.
    grads = {"a": jnp.full(3, 3.0), "b": jnp.full(4, 4.0), "visual": jnp.full(2, 1e3)}
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(jnp.linalg.norm(_first_moments(state)) / 0.1, 1.0, rtol=1e-5)
    # Below the bound nothing is clipped, and the huge frozen gradient does not enter the norm.
    small = {"a": jnp.full(3, 0.1), "b": jnp.full(4, 0.2), "visual": jnp.full(2, 1e3)}
    _, state = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(_first_moments(state) / 0.1, [0.1] * 3 + [0.2] * 4, rtol=1e-5)


@pytest.mark.parametrize("rules,message", [
    (((r"visual/[", "frozen"),), r"param_rules\[0\]: invalid regex 'visual/\['"),
    (((r"visual/.*", "slow"),), r"param_rules\[0\] for 'visual/\.\*': rule 'slow'"),
    (((r"head/.*", 1.0), (r"visual/.*", -0.5)), r"param_rules\[1\] for 'visual/\.\*': rule -0.5"),
    ((r"visual/.*",), r"param_rules\[0\] = 'visual/\.\*': expected \(regex"),
    (((r"vision/.*", "frozen"),), r"\['vision/\.\*'\] match no parameter path .*'head/bias'"),
])
def test_invalid_rules_raise_naming_them(rules, message):
    params = {"head": {"bias": jnp.zeros(2)}, "visual": {"proj": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=message):
        tx = optimizer.build_optimizer(_config(param_rules=rules))
        tx.init(params)


def test_bf16_compute_keeps_float32_master_weights_and_state():
    model = TinyModel(nnx.Rngs(1))
    config = _config(learning_rate=1e-2, warmup_steps=0)
    opt = nnx.Optimizer(model, optimizer.build_optimizer(config), wrt=nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.ones((2, 3))

    def loss(params):
        compute = nnx.merge(graphdef, optimizer.cast_floating(params, config.compute_dtype))
        out = compute(x.astype(config.compute_dtype))
        assert out.dtype == jnp.bfloat16
        return jnp.mean(out.astype(jnp.float32) ** 2)

    grads = jax.grad(loss)(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    opt.update(model, grads)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(opt.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert moments and {m.dtype for m in moments} == {jnp.dtype(jnp.float32)}
    assert optimizer.cast_floating({"ids": jnp.arange(3), "w": jnp.ones(2)}, "bfloat16")["ids"].dtype == jnp.int32
