"""GRPO math as pure jax functions: group advantages, the clipped per-token policy loss, loss aggregation.

Nothing here knows about models or tasks: inputs are rewards, per-token log-probabilities and masks. Option
names follow TRL's GRPOConfig (`num_generations`, `beta`, `epsilon`, `epsilon_high`, `loss_type`,
`scale_rewards`, `mask_truncated_completions`, `num_iterations`); `grpo_advantages` and `grpo_loss` read them
from the config of `m2io_jax.rl.config.get_grpo_config()`.

Exact gradient accumulation: every aggregation returns a `WeightedLoss` (an unreduced sum and its denominator,
as in tunix's `WeightedMetric`). A batch split by rows into micro-batches gives the full batch's loss, and its
gradient, as sum(micro sums) / sum(micro denominators), because no denominator depends on the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


def _lookup(registry: dict, name: str, what: str):
    """registry[name], or a ValueError naming the valid keys."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]


# ------------------------------------------------------------------------------------------- advantages


def _group_std(centred: jax.Array) -> jax.Array:
    """Unbiased (ddof=1) std of each group, [B, 1], from rewards already centred on the group mean [B, G]."""
    g = centred.shape[1]
    return jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (g - 1))


def _batch_std(rewards: jax.Array) -> jax.Array:
    """Unbiased (ddof=1) std of all B * G rewards [B, G], a scalar."""
    return jnp.std(rewards, ddof=1)


# scale_rewards name -> (rewards [B, G], rewards centred on the group mean [B, G]) -> std broadcastable to [B, G].
REWARD_SCALES: dict[str, Callable[[jax.Array, jax.Array], jax.Array] | None] = {
    "group": lambda rewards, centred: _group_std(centred),
    "batch": lambda rewards, centred: _batch_std(rewards),
    "none": None,
}


def _scaled(advantages: jax.Array, rewards: jax.Array, centred: jax.Array, scale_rewards: str,
            epsilon: float) -> jax.Array:
    std = _lookup(REWARD_SCALES, scale_rewards, "scale_rewards")
    return advantages if std is None else advantages / (std(rewards, centred) + epsilon)


def _grpo_advantages(rewards: jax.Array, scale_rewards: str, epsilon: float) -> jax.Array:
    """(r - group mean) / (std + epsilon), the std chosen by `scale_rewards`. [B, G] -> [B, G]."""
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    return _scaled(centred, rewards, centred, scale_rewards, epsilon)


def _dr_grpo_advantages(rewards: jax.Array, scale_rewards: str, epsilon: float) -> jax.Array:
    """r - group mean, never scaled (Dr. GRPO removes the std normaliser). [B, G] -> [B, G]."""
    if scale_rewards != "none":
        raise ValueError(f"advantage estimator 'dr_grpo' is unscaled by definition; set scale_rewards='none' "
                         f"(got {scale_rewards!r}) or use estimator 'grpo'")
    return rewards - jnp.mean(rewards, axis=1, keepdims=True)


def _rloo_advantages(rewards: jax.Array, scale_rewards: str, epsilon: float) -> jax.Array:
    """r_i - mean of the group's other G - 1 rewards (= G / (G - 1) * (r_i - group mean)), then scaled like grpo.

    [B, G] -> [B, G].
    """
    g = rewards.shape[1]
    total = jnp.sum(rewards, axis=1, keepdims=True)
    advantages = rewards - (total - rewards) / (g - 1)
    centred = rewards - total / g
    return _scaled(advantages, rewards, centred, scale_rewards, epsilon)


# advantage estimator name -> (rewards [B, G], scale_rewards, epsilon) -> advantages [B, G].
ADVANTAGE_ESTIMATORS: dict[str, Callable[[jax.Array, str, float], jax.Array]] = {
    "grpo": _grpo_advantages,
    "dr_grpo": _dr_grpo_advantages,
    "rloo": _rloo_advantages,
}


def group_advantages(rewards: jax.Array, num_generations: int, *, estimator: str = "grpo",
                     scale_rewards: str = "group", epsilon: float = 1e-4) -> jax.Array:
    """Advantages of G completions per prompt, relative to their group.

    Args:
      rewards: [B * G] (the G completions of a prompt adjacent) or [B, G].
      num_generations: G, at least 2 (a baseline needs another sample).
      estimator: a key of ADVANTAGE_ESTIMATORS: "grpo" (mean-centred, scaled), "dr_grpo" (mean-centred,
        unscaled; requires scale_rewards="none"), "rloo" (leave-one-out baseline, scaled like grpo).
      scale_rewards: a key of REWARD_SCALES: "group" (each group's std), "batch" (the std of all B * G rewards,
        as TRL), "none". Both stds are the unbiased estimator (ddof=1, as torch.std in TRL and tunix).
      epsilon: added to the std, so a group whose rewards all tie (std 0) gets advantages 0, not NaN.

    Returns:
      float32 advantages of the same shape as `rewards`.
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for a group baseline, got {num_generations}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.size % num_generations or (rewards.ndim == 2 and rewards.shape[1] != num_generations) \
            or rewards.ndim not in (1, 2):
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of num_generations="
                         f"{num_generations}; expected [B * G] or [B, G]")
    estimate = _lookup(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    grouped = rewards.reshape(-1, num_generations)  # [B, G]
    return estimate(grouped, scale_rewards, epsilon).reshape(rewards.shape)


def grpo_advantages(rewards: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """`group_advantages` with G, estimator, scale_rewards and std epsilon from a GRPO config. Shapes as there.

    Truncated completions (`mask_truncated_completions`) are included here, as in TRL: they are rewarded and
    shape their group's baseline; only their loss weight is zeroed (`mask_truncated`).
    """
    return group_advantages(rewards, config.num_generations, estimator=config.advantage_estimator,
                            scale_rewards=config.scale_rewards, epsilon=config.std_epsilon)


# ------------------------------------------------------------------------------------------- per-token loss


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the positions where mask is 1 (0 when the mask is empty). x, mask: same shape."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, >= 0. [N, T]."""
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0


def policy_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array, *, old_logp: jax.Array | None = None,
                ref_logp: jax.Array | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate plus k3 KL, per token.

    loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3(ref, logp),
    ratio = exp(logp - old_logp).

    Args:
      logp: [N, T] log-probabilities of the completion tokens under the policy being trained.
      advantages: [N] one advantage per completion.
      mask: [N, T] 1 on completion tokens that carry loss, 0 on padding (and on masked truncated rows).
      old_logp: [N, T] log-probabilities under the policy that sampled; None (num_iterations == 1) uses
        stop_gradient(logp): ratio 1 in value, the policy gradient in derivative, no separate pass.
      ref_logp: [N, T] reference log-probabilities; only read when beta != 0 (beta == 0 needs no reference).
      epsilon, epsilon_high: lower and upper clip range; epsilon_high None means epsilon (symmetric).
      beta: weight of the KL term.

    Returns:
      per-token losses [N, T] (0 where mask is 0) and masked-mean diagnostics: "clip_fraction/low" (ratio
      < 1 - epsilon with A < 0: the clip is active and the token has no gradient), "clip_fraction/high" (ratio >
      1 + epsilon_high with A > 0), "ratio/mean", and "kl/mean" when beta != 0.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if logp.ndim != 2 or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss expects logp [N, T], mask [N, T], advantages [N]; got logp {logp.shape}, "
                         f"mask {mask.shape}, advantages {advantages.shape}")
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old_logp)  # [N, T]
    a = advantages[:, None].astype(logp.dtype)  # [N, 1]
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    loss = -jnp.minimum(ratio * a, clipped * a)
    diagnostics = {
        "clip_fraction/low": masked_mean(((ratio < 1.0 - epsilon) & (a < 0)).astype(jnp.float32), mask),
        "clip_fraction/high": masked_mean(((ratio > 1.0 + epsilon_high) & (a > 0)).astype(jnp.float32), mask),
        "ratio/mean": masked_mean(ratio, mask),
    }
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"beta={beta} needs ref_logp [N, T] (reference log-probabilities); got None")
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
        diagnostics["kl/mean"] = masked_mean(kl, mask)
    return jnp.where(mask > 0, loss, 0.0), diagnostics


def mask_truncated(mask: jax.Array, truncated: jax.Array) -> jax.Array:
    """The loss mask [N, T] with every row flagged truncated [N] (no end-of-sequence token) zeroed."""
    return mask * (1 - truncated.astype(mask.dtype))[:, None]


# ------------------------------------------------------------------------------------------- aggregation


class WeightedLoss(NamedTuple):
    """An unreduced loss sum and its denominator; add them across micro-batches, divide once with `value`."""

    total: jax.Array
    denominator: jax.Array

    def value(self) -> jax.Array:
        """total / denominator (denominators are counts, so clamping at 1 only guards an empty batch)."""
        return self.total / jnp.maximum(self.denominator, 1.0)


def _sequence_mean_token_mean(loss: jax.Array, mask: jax.Array, sequences: jax.Array,
                              max_completion_length: int | None) -> WeightedLoss:
    """GRPO: each sequence's mean over its tokens, averaged over sequences (rows without tokens count as 0)."""
    per_sequence = jnp.sum(loss * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [N]
    return WeightedLoss(jnp.sum(per_sequence), sequences)


def _token_mean(loss: jax.Array, mask: jax.Array, sequences: jax.Array,
                max_completion_length: int | None) -> WeightedLoss:
    """DAPO: sum over all tokens / number of tokens, so long completions weigh by their length."""
    return WeightedLoss(jnp.sum(loss * mask), jnp.sum(mask))


def _constant_normaliser(loss: jax.Array, mask: jax.Array, sequences: jax.Array,
                         max_completion_length: int | None) -> WeightedLoss:
    """Dr. GRPO: sum over all tokens / (number of sequences * max_completion_length), a constant."""
    if max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the configured completion budget)")
    return WeightedLoss(jnp.sum(loss * mask), sequences * max_completion_length)


# loss_type -> (per-token loss [N, T], mask [N, T], number of sequences, max_completion_length) -> WeightedLoss.
LOSS_AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array, jax.Array, int | None], WeightedLoss]] = {
    "grpo": _sequence_mean_token_mean,
    "dapo": _token_mean,
    "token_mean": _token_mean,
    "dr_grpo": _constant_normaliser,
}


def aggregate_loss(loss: jax.Array, mask: jax.Array, loss_type: str = "grpo", *,
                   max_completion_length: int | None = None, row_mask: jax.Array | None = None) -> WeightedLoss:
    """Reduces per-token losses [N, T] under mask [N, T] to a WeightedLoss by a LOSS_AGGREGATIONS key.

    row_mask: [N] 1 for a real completion, 0 for a row that only pads the batch to its bucket; the "grpo" and
    "dr_grpo" denominators count real rows (None: every row is real). A truncated row whose mask was zeroed
    by `mask_truncated` is still a real row: it counts in the denominator with loss 0, as in TRL.
    Micro-batches must split by rows (whole sequences) for "grpo"; any split is exact for the others.
    """
    aggregate = _lookup(LOSS_AGGREGATIONS, loss_type, "loss_type")
    mask = mask.astype(jnp.float32)
    if row_mask is None:
        sequences = jnp.asarray(loss.shape[0], jnp.float32)
    else:
        mask = mask * row_mask.astype(jnp.float32)[:, None]
        sequences = jnp.sum(row_mask.astype(jnp.float32))
    return aggregate(loss, mask, sequences, max_completion_length)


def grpo_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array, config: ml_collections.ConfigDict, *,
              old_logp: jax.Array | None = None, ref_logp: jax.Array | None = None,
              truncated: jax.Array | None = None,
              row_mask: jax.Array | None = None) -> tuple[WeightedLoss, dict[str, jax.Array]]:
    """The GRPO objective of one (micro-)batch from a GRPO config: masking, per-token loss, aggregation.

    Args:
      logp, old_logp, ref_logp, mask: [N, T] as in `policy_loss`; old_logp may be None only when
        config.num_iterations == 1 (with more iterations the sampling policy's log-probs are required).
      advantages: [N].
      truncated: [N] bool, rows that hit the length budget; zeroed when config.mask_truncated_completions.
      row_mask: [N] 0 for rows that only pad the batch to its bucket (see `aggregate_loss`); None: all real.

    Returns:
      the WeightedLoss of config.loss_type and the diagnostics of `policy_loss`.
    """
    if old_logp is None and config.num_iterations > 1:
        raise ValueError(f"num_iterations={config.num_iterations} reuses each rollout for several updates, so "
                         f"old_logp [N, T] (log-probs of the policy that sampled) is required; got None")
    if config.mask_truncated_completions:
        if truncated is None:
            raise ValueError("mask_truncated_completions is on but no truncated [N] flags were given")
        mask = mask_truncated(mask, truncated)
    if row_mask is not None:
        mask = mask * row_mask.astype(mask.dtype)[:, None]
    loss, diagnostics = policy_loss(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp,
                                    epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta)
    weighted = aggregate_loss(loss, mask, config.loss_type, max_completion_length=config.max_completion_length,
                              row_mask=row_mask)
    return weighted, diagnostics
