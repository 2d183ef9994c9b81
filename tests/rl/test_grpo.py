"""GRPO math pinned against values worked out by hand (the arithmetic is in the comments)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2io_jax.rl import grpo
from m2io_jax.rl.config import get_grpo_config

# Two groups of G=3. Group 0: [1, 2, 3], mean 2, centred [-1, 0, 1], unbiased std sqrt(2/2) = 1.
# Group 1: [0, 0, 4], mean 4/3, centred [-4/3, -4/3, 8/3], unbiased var (16+16+64)/9/2 = 16/3, std 4/sqrt(3).
# Batch: mean 5/3, squared deviations sum 120/9, unbiased var 120/9/5 = 8/3, std sqrt(8/3) = 1.6329932.
REWARDS = [[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]
INV_SQRT3 = 1 / math.sqrt(3)
BATCH_STD = math.sqrt(8 / 3)

HAND_ADVANTAGES = {
    ("grpo", "group"): [[-1.0, 0.0, 1.0], [-INV_SQRT3, -INV_SQRT3, 2 * INV_SQRT3]],
    ("grpo", "batch"): [[-1 / BATCH_STD, 0.0, 1 / BATCH_STD],
                        [-(4 / 3) / BATCH_STD, -(4 / 3) / BATCH_STD, (8 / 3) / BATCH_STD]],
    ("grpo", "none"): [[-1.0, 0.0, 1.0], [-4 / 3, -4 / 3, 8 / 3]],
    ("dr_grpo", "none"): [[-1.0, 0.0, 1.0], [-4 / 3, -4 / 3, 8 / 3]],
    # Leave-one-out: 4 - (0 + 0) / 2 = 4; 0 - (0 + 4) / 2 = -2; 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0.
    ("rloo", "none"): [[-1.5, 0.0, 1.5], [-2.0, -2.0, 4.0]],
    ("rloo", "group"): [[-1.5, 0.0, 1.5], [-2 * math.sqrt(3) / 4, -2 * math.sqrt(3) / 4, 4 * math.sqrt(3) / 4]],
}


@pytest.mark.parametrize("estimator,scale", sorted(HAND_ADVANTAGES))
def test_advantages_match_hand_values(estimator, scale):
    got = grpo.group_advantages(jnp.array(REWARDS), 3, estimator=estimator, scale_rewards=scale, epsilon=0.0)
    np.testing.assert_allclose(got, HAND_ADVANTAGES[(estimator, scale)], rtol=1e-6, atol=1e-7)


def test_advantages_of_flat_rewards_keep_their_shape_and_use_epsilon():
    got = grpo.group_advantages(jnp.array(REWARDS).reshape(-1), 3)  # default grpo, group std, epsilon 1e-4
    # Group 0: [-1, 0, 1] / (1 + 1e-4).
    np.testing.assert_allclose(got[:3], [-0.99990001, 0.0, 0.99990001], rtol=1e-6)
    assert got.shape == (6,)


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "group")])
def test_tied_rewards_give_zero_advantages_not_nan(estimator, scale):
    got = grpo.group_advantages(jnp.array([[2.0, 2.0, 2.0, 2.0]]), 4, estimator=estimator, scale_rewards=scale)
    np.testing.assert_array_equal(got, np.zeros((1, 4)))


def test_advantages_from_the_config():
    config = get_grpo_config()
    config.update(num_generations=3, advantage_estimator="rloo", scale_rewards="none")
    np.testing.assert_allclose(grpo.grpo_advantages(jnp.array(REWARDS).reshape(-1), config),
                               np.reshape(HAND_ADVANTAGES[("rloo", "none")], -1), rtol=1e-6)


def test_advantage_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*\['dr_grpo', 'grpo', 'rloo'\]"):
        grpo.group_advantages(jnp.zeros(4), 2, estimator="ppo")
    with pytest.raises(ValueError, match=r"unknown scale_rewards 'std'.*\['batch', 'group', 'none'\]"):
        grpo.group_advantages(jnp.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="dr_grpo.*scale_rewards='none'"):
        grpo.group_advantages(jnp.zeros(4), 2, estimator="dr_grpo", scale_rewards="group")
    with pytest.raises(ValueError, match=r"\(5,\).*num_generations=2"):
        grpo.group_advantages(jnp.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.group_advantages(jnp.zeros(4), 1)


# Ratios per token; the last token is padding (mask 0) and must not count anywhere.
RATIOS = [0.5, 0.9, 1.25, 1.5, 2.0]
MASK = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def _clipped_case(epsilon, epsilon_high):
    old = jnp.full((2, 5), -1.0)
    logp = old + jnp.log(jnp.array([RATIOS, RATIOS]))
    advantages = jnp.array([1.0, -1.0])

    def total(lp):
        loss, diagnostics = grpo.policy_loss(lp, advantages, jnp.array(MASK), old_logp=old, epsilon=epsilon,
                                             epsilon_high=epsilon_high)
        return jnp.sum(loss), (loss, diagnostics)

    grads, (loss, diagnostics) = jax.grad(total, has_aux=True)(logp)
    return loss, diagnostics, grads


def test_clipped_loss_with_asymmetric_epsilons():
    loss, diagnostics, grads = _clipped_case(0.2, 0.28)  # clip range [0.8, 1.28]
    # A = +1: -min(r, clip(r)) = [-0.5, -0.9, -1.25, -min(1.5, 1.28)]; gradient -r where r is the minimum.
    # A = -1: max(r, clip(r)) = [max(0.5, 0.8), 0.9, 1.25, max(1.5, 1.28)]; gradient r where r is the maximum.
    np.testing.assert_allclose(loss, [[-0.5, -0.9, -1.25, -1.28, 0.0], [0.8, 0.9, 1.25, 1.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(grads, [[-0.5, -0.9, -1.25, 0.0, 0.0], [0.0, 0.9, 1.25, 1.5, 0.0]], rtol=1e-6)
    # One of 8 real tokens each: r=0.5 with A<0 (low), r=1.5 with A>0 (high). Mean ratio 2 * 4.15 / 8.
    np.testing.assert_allclose(diagnostics["clip_fraction/low"], 0.125)
    np.testing.assert_allclose(diagnostics["clip_fraction/high"], 0.125)
    np.testing.assert_allclose(diagnostics["ratio/mean"], 1.0375, rtol=1e-6)
    assert "kl/mean" not in diagnostics


def test_epsilon_high_defaults_to_epsilon():
    loss, diagnostics, grads = _clipped_case(0.2, None)  # clip range [0.8, 1.2]
    # A = +1: r=1.25 and r=1.5 are both clipped to 1.2 and lose their gradient; A = -1 is unchanged.
    np.testing.assert_allclose(loss, [[-0.5, -0.9, -1.2, -1.2, 0.0], [0.8, 0.9, 1.25, 1.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(grads, [[-0.5, -0.9, 0.0, 0.0, 0.0], [0.0, 0.9, 1.25, 1.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(diagnostics["clip_fraction/high"], 0.25)


def test_on_policy_loss_is_minus_advantage_with_the_policy_gradient():
    logp = jnp.array([[-0.3, -2.0], [-1.1, -0.7]])
    advantages = jnp.array([2.0, -0.5])

    def total(lp):
        return jnp.sum(grpo.policy_loss(lp, advantages, jnp.ones((2, 2)))[0])

    value, grads = jax.value_and_grad(total)(logp)
    # old_logp = stop_gradient(logp): ratio 1, loss -A per token, d loss / d logp = -A.
    np.testing.assert_allclose(value, -(2 * 2.0 + 2 * -0.5))
    np.testing.assert_allclose(grads, [[-2.0, -2.0], [0.5, 0.5]])


def test_k3_kl_value_and_gradient_sign():
    logp = jnp.zeros((1, 3))
    ref = jnp.array([[math.log(2), -math.log(2), 0.0]])

    def total(lp):
        loss, diagnostics = grpo.policy_loss(lp, jnp.zeros(1), jnp.ones((1, 3)), ref_logp=ref, beta=0.1)
        return jnp.sum(loss), (loss, diagnostics)

    grads, (loss, diagnostics) = jax.grad(total, has_aux=True)(logp)
    # k3 = e^d - d - 1 with d = ref - logp: d = ln2 -> 1 - ln2 = 0.3068528; d = -ln2 -> ln2 - 0.5 = 0.1931472.
    np.testing.assert_allclose(loss, [[0.03068528, 0.01931472, 0.0]], rtol=1e-6)
    # d k3 / d logp = 1 - e^d: -1 where the reference is likelier (descent raises logp), +0.5 where it is not.
    np.testing.assert_allclose(grads, [[-0.1, 0.05, 0.0]], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(diagnostics["kl/mean"], 0.5 / 3, rtol=1e-6)  # (0.3068528 + 0.1931472) / 3


def test_beta_needs_reference_only_when_nonzero():
    logp, mask = jnp.zeros((1, 2)), jnp.ones((1, 2))
    grpo.policy_loss(logp, jnp.ones(1), mask, ref_logp=None, beta=0.0)
    with pytest.raises(ValueError, match="beta=0.04 needs ref_logp"):
        grpo.policy_loss(logp, jnp.ones(1), mask, ref_logp=None, beta=0.04)


# Per-token losses on a ragged mask: row sums 6, 5, 4 over 3, 1, 4 tokens (means 2, 5, 1); 8 tokens, sum 15.
LOSS = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
RAGGED = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("loss_type,total,denominator", [
    ("grpo", 8.0, 3.0),           # (2 + 5 + 1) / 3 sequences
    ("dapo", 15.0, 8.0),          # 15 / 8 tokens
    ("token_mean", 15.0, 8.0),
    ("dr_grpo", 15.0, 18.0),      # 15 / (3 sequences * max_completion_length 6)
])
def test_loss_types_on_a_ragged_mask(loss_type, total, denominator):
    weighted = grpo.aggregate_loss(LOSS, RAGGED, loss_type, max_completion_length=6)
    np.testing.assert_allclose(weighted.total, total, rtol=1e-6)
    np.testing.assert_allclose(weighted.denominator, denominator)
    np.testing.assert_allclose(weighted.value(), total / denominator, rtol=1e-6)


@pytest.mark.parametrize("loss_type,total,denominator", [
    ("grpo", 7.0, 2.0),           # the third row pads the batch: (2 + 5) / 2
    ("token_mean", 11.0, 4.0),
    ("dr_grpo", 11.0, 12.0),
])
def test_padding_rows_do_not_count(loss_type, total, denominator):
    weighted = grpo.aggregate_loss(LOSS, RAGGED, loss_type, max_completion_length=6, row_mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose((weighted.total, weighted.denominator), (total, denominator), rtol=1e-6)


def test_aggregation_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown loss_type 'bnpo'.*\['dapo', 'dr_grpo', 'grpo', 'token_mean'\]"):
        grpo.aggregate_loss(LOSS, RAGGED, "bnpo")
    with pytest.raises(ValueError, match="'dr_grpo' needs max_completion_length"):
        grpo.aggregate_loss(LOSS, RAGGED, "dr_grpo")


def _config(**overrides):
    config = get_grpo_config()
    config.update(overrides)
    return config


@pytest.mark.parametrize("loss_type,masked,unmasked", [
    # On-policy with beta 0 the per-token loss is -A; A = [1, 2, 3] over 3, 1 and 4 tokens, row 1 truncated.
    ("grpo", -4 / 3, -2.0),           # masked: (-1 + 0 - 3) / 3 rows (the truncated row still counts, as TRL)
    ("token_mean", -15 / 7, -17 / 8),  # masked: (3 * -1 + 4 * -3) / 7 tokens
])
def test_mask_truncated_completions(loss_type, masked, unmasked):
    logp = jnp.full((3, 4), -0.5)
    advantages = jnp.array([1.0, 2.0, 3.0])
    truncated = jnp.array([False, True, False])
    for flag, expected in ((True, masked), (False, unmasked)):
        config = _config(loss_type=loss_type, mask_truncated_completions=flag)

        def value(lp, config=config):
            return grpo.grpo_loss(lp, advantages, RAGGED, config, truncated=truncated)[0].value()

        np.testing.assert_allclose(value(logp), expected, rtol=1e-6)
        grads = jax.grad(value)(logp)
        assert bool(jnp.all(grads[1] == 0)) == flag


def test_grpo_loss_checks_its_inputs():
    logp, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="num_iterations=2.*old_logp"):
        grpo.grpo_loss(logp, jnp.ones(2), mask, _config(num_iterations=2))
    with pytest.raises(ValueError, match="mask_truncated_completions.*truncated"):
        grpo.grpo_loss(logp, jnp.ones(2), mask, _config(mask_truncated_completions=True))
    with pytest.raises(ValueError, match=r"advantages \(3,\)"):
        grpo.grpo_loss(logp, jnp.ones(3), mask, _config())


def _accumulation_problem():
    """A tiny differentiable policy: logp[n, t] = log_sigmoid(features[n, t] . theta), off-policy and with KL."""
    rng = np.random.default_rng(0)
    n, t, d = 6, 5, 4
    features = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=d), jnp.float32)
    lengths = np.array([5, 1, 3, 2, 5, 4])
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.int32)
    batch = dict(
        features=features, mask=mask,
        advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
        old_logp=jax.nn.log_sigmoid(features @ (theta + 0.3 * jnp.asarray(rng.normal(size=d), jnp.float32))),
        ref_logp=jax.nn.log_sigmoid(features @ (theta + 0.5 * jnp.asarray(rng.normal(size=d), jnp.float32))),
        truncated=jnp.array([False, False, True, False, False, False]),
    )
    return theta, batch


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batch_accumulation_equals_the_full_batch(loss_type):
    theta, batch = _accumulation_problem()
    config = _config(loss_type=loss_type, beta=0.05, epsilon_high=0.28, max_completion_length=5,
                     mask_truncated_completions=True, num_iterations=2)

    def weighted(theta, rows):
        part = {k: v[rows] for k, v in batch.items()}
        logp = jax.nn.log_sigmoid(part["features"] @ theta)
        return grpo.grpo_loss(logp, part["advantages"], part["mask"], config, old_logp=part["old_logp"],
                              ref_logp=part["ref_logp"], truncated=part["truncated"])[0]

    full_value, full_grad = jax.value_and_grad(lambda th: weighted(th, slice(0, 6)).value())(theta)
    total, denominator, grad_sum = 0.0, 0.0, jnp.zeros_like(theta)
    micro_values = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, grad = jax.value_and_grad(lambda th, rows=rows: weighted(th, rows).total)(theta)
        micro = weighted(theta, rows)
        total, denominator, grad_sum = total + part, denominator + micro.denominator, grad_sum + grad
        micro_values.append(float(micro.value()))
    np.testing.assert_allclose(total / denominator, full_value, rtol=1e-6)
    np.testing.assert_allclose(grad_sum / denominator, full_grad, rtol=1e-5, atol=1e-7)
    # The naive mean of micro-batch means is a different number, so the comparison above can fail.
    assert abs(np.mean(micro_values) - float(full_value)) > 1e-3
