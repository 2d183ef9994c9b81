"""Default configs of the RL package: the GRPO objective, the optimizer and the rollout, as ml_collections
ConfigDicts; `get_trainer_config` gathers the three sections `m2io_jax.rl.trainer.Trainer` reads.

GRPO fields (TRL's GRPOConfig names; read by `m2io_jax.rl.grpo.grpo_advantages` and `grpo_loss`):
  num_generations: completions sampled per prompt (G).
  advantage_estimator: "grpo", "dr_grpo" or "rloo" (`grpo.ADVANTAGE_ESTIMATORS`).
  scale_rewards: "group", "batch" or "none" (`grpo.REWARD_SCALES`); the stds are unbiased (ddof=1).
  std_epsilon: added to the reward std (TRL: 1e-4), so tied groups get advantage 0.
  beta: weight of the k3 KL to the reference; 0 (TRL's default) needs no reference model.
  epsilon / epsilon_high: clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high None means epsilon.
  loss_type: "grpo", "dapo", "token_mean" or "dr_grpo" (`grpo.LOSS_AGGREGATIONS`).
  max_completion_length: the completion budget in tokens, the constant of "dr_grpo" (None: the trainer uses
    rollout.max_new_tokens).
  mask_truncated_completions: completions that hit the budget get zero loss weight (they keep their reward
    and their place in the group baseline, as in TRL).
  num_iterations: updates per rollout; 1 takes old log-probs as stop_gradient(log-probs), no separate pass.

Optimizer fields (read by `m2io_jax.rl.optimizer.build_optimizer`):
  learning_rate: peak learning rate, reached after `warmup_steps` of linear warmup from 0.
  warmup_steps, total_steps: the cosine decays from the peak at `warmup_steps` to the floor at `total_steps`
    (then stays there).
  min_learning_rate_ratio: the floor as a fraction of the peak.
  b1, b2, eps, weight_decay: AdamW (decoupled decay, scaled by the learning rate and its multiplier).
  max_grad_norm: global-norm clipping over the trainable parameters; 0 disables it.
  param_rules: ((regex, rule), ...) matched in order with re.fullmatch against the "/"-joined parameter path
    (e.g. "visual/blocks/qkv"); the first match wins. rule is "frozen" (or 0.0: no update, no optimizer
    state) or a positive learning-rate multiplier. Unmatched parameters train at the full rate.
  param_dtype / compute_dtype: master weights and optimizer state in `param_dtype`; the loss casts floating
    parameters to `compute_dtype` (`optimizer.cast_floating`), e.g. float32 master with bfloat16 compute.

LoRA fields (read by `m2io_jax.models.lora.apply_config`, called by `m2io_jax.train` before the GRPO stage):
  rank: adapter rank r; 0 turns LoRA off (every parameter trains).
  alpha: the update is scaled by alpha / rank.
  target: regex searched in each projection's path (e.g. "language_model/layers/q_proj"); the default adapts
    the attention (q, k, v, o) and MLP (gate, up, down) projections of the language model.
  seed: draws the A factors (B starts at zero, so the adapted model starts equal to the base).

Rollout fields (read by `m2io_jax.rl.trainer.Trainer`):
  max_new_tokens: the completion budget per sample; a completion that reaches it without a stop token is
    flagged truncated.
  temperature, top_k, top_p: sampling settings (`m2io_jax.sampling`); GRPO needs temperature > 0, and the
    trainer's log-probs use the same temperature. top_k / top_p None: no filter.
  seed: step s samples with a seed derived from (seed, s), so every step draws fresh streams.
  prompt_lengths, batch_sizes, completion_lengths: bucket sizes that prompt lengths, prompt counts and SFT
    target lengths pad to; () means powers of two (at least min_prompt_length / 1 / min_completion_length).
    GRPO completions always pad to max_new_tokens.
  micro_batch_prompts: prompt rows per training micro-batch (a divisor of the padded batch); 0: all in one.
    The update sums the micro-batches' unreduced losses, denominators and gradients and divides once, so it
    equals the full batch's.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_grpo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_generations = 8
    c.advantage_estimator = "grpo"
    c.scale_rewards = "group"
    c.std_epsilon = 1e-4
    c.beta = 0.0
    c.epsilon = 0.2
    c.epsilon_high = config_dict.placeholder(float)
    c.loss_type = "grpo"
    c.max_completion_length = config_dict.placeholder(int)
    c.mask_truncated_completions = False
    c.num_iterations = 1
    return c


def get_optimizer_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.learning_rate = 1e-6
    c.warmup_steps = 10
    c.total_steps = 1000
    c.min_learning_rate_ratio = 0.1
    c.b1 = 0.9
    c.b2 = 0.99
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.param_rules = ()
    c.param_dtype = "float32"
    c.compute_dtype = "bfloat16"
    return c


def get_lora_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.rank = 0
    c.alpha = 16.0
    c.target = r"(q|k|v|o|gate|up|down)_proj$"
    c.seed = 0
    return c


def get_rollout_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.max_new_tokens = 64
    c.temperature = 1.0
    c.top_k = config_dict.placeholder(int)
    c.top_p = config_dict.placeholder(float)
    c.seed = 0
    c.prompt_lengths = ()
    c.min_prompt_length = 16
    c.batch_sizes = ()
    c.completion_lengths = ()
    c.min_completion_length = 16
    c.micro_batch_prompts = 0
    return c


def get_trainer_config() -> ml_collections.ConfigDict:
    """The sections the trainer reads: `grpo`, `optimizer` and `rollout`."""
    c = ml_collections.ConfigDict()
    c.grpo = get_grpo_config()
    c.optimizer = get_optimizer_config()
    c.rollout = get_rollout_config()
    return c
