"""The trainer's host layout, its SFT and GRPO steps on a tiny text Qwen2, and its bounded compilations."""

import jax
import numpy as np
import pytest
from flax import nnx

from m2io_jax.rl import rollout
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from tests.rl.trainer_helpers import PROMPTS, STOP, fraction_reward, tiny_text_model, trainer_config

GRPO_METRICS = {"reward/mean", "reward/std", "reward/fraction", "groups_all_tied", "count/empty", "loss", "grad_norm",
                "clip_fraction", "completion_length", "truncated_fraction", "logprob_diff/sampler_vs_trainer",
                "tokens_per_second", "time/rollout", "time/reward", "time/logprobs", "time/update",
                "compiled_programs"}


def test_step_seed_is_fresh_per_step_and_reproducible():
    seeds = [rollout.step_seed(7, step) for step in range(5)]
    assert len(set(seeds)) == 5
    assert seeds == [rollout.step_seed(7, step) for step in range(5)]
    assert rollout.step_seed(8, 0) != seeds[0]


def test_pad_completions_layout_truncation_and_padding_rows():
    out = rollout.pad_completions([[5, 6, 2], [5, 6, 7], [9], []], rows=3, num_samples=2, length=4,
                                  stop_tokens=[2], budget=3, pad_id=1)
    np.testing.assert_array_equal(out.tokens[0], [[5, 6, 2, 1], [5, 6, 7, 1]])
    np.testing.assert_array_equal(out.tokens[1], [[9, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(out.lengths, [[3, 3], [1, 0], [0, 0]])
    # Only [5, 6, 7] used the whole budget of 3 without a stop token.
    np.testing.assert_array_equal(out.truncated, [[False, True], [False, False], [False, False]])
    np.testing.assert_array_equal(out.row_mask, [1, 1, 0])
    assert out.num_tokens == 7
    logp = rollout.pad_logprobs([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0], []], out)
    np.testing.assert_array_equal(logp[1, 0], [-7.0, 0, 0, 0])
    with pytest.raises(ValueError, match="completion 1 has 5 tokens"):
        rollout.pad_completions([[1], [1, 2, 3, 4, 5]], rows=1, num_samples=2, length=4, stop_tokens=[], budget=4)


def test_sft_step_lowers_the_loss_on_a_fixed_batch():
    trainer = Trainer(tiny_text_model(), trainer_config(learning_rate=1e-2), reward_fn=None, stop_tokens=[STOP])
    batch = PromptBatch(PROMPTS, None, [None] * 4, targets=[[11, 12, STOP], [13, STOP], [14, 15, 16, STOP], [STOP]])
    losses = [trainer.sft_step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_grpo_steps_report_every_metric_and_compile_nothing_new_within_buckets():
    trainer = Trainer(tiny_text_model(), trainer_config(), reward_fn=fraction_reward(), stop_tokens=[STOP])
    first = trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=0)
    assert GRPO_METRICS <= set(first) and "kl" not in first  # beta = 0: no reference, no KL
    assert first["logprob_diff/sampler_vs_trainer"] < 1e-4  # float32: sampler and trainer agree
    # Other prompts of lengths in the same bucket (<= 16 tokens) and 3 prompts (bucket 4): nothing compiles.
    second = trainer.grpo_step(PromptBatch([[5] * 16, [6, 7], [9]], None, [None] * 3), step=1)
    assert second["compiled_programs"] == first["compiled_programs"]
    assert 0 < second["completion_length"] <= 8


def test_reference_and_several_iterations():
    config = trainer_config(beta=0.1, num_iterations=2)
    trainer = Trainer(tiny_text_model(), config, reward_fn=fraction_reward(), stop_tokens=[STOP])
    metrics = [trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=s) for s in range(2)]
    assert metrics[0]["kl"] >= 0 and metrics[1]["kl"] > 0  # the policy has moved away from the reference
    assert metrics[0]["logprob_diff/sampler_vs_trainer"] < 1e-4  # old log-probs recomputed in the training layout


def test_micro_batched_update_equals_the_full_batch():
    def one_step(micro_batch_prompts):
        config = trainer_config(learning_rate=1e-3)
        config.rollout.micro_batch_prompts = micro_batch_prompts
        trainer = Trainer(tiny_text_model(), config, reward_fn=fraction_reward(), stop_tokens=[STOP])
        metrics = trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=0)
        return metrics, jax.tree.leaves(nnx.state(trainer.model, nnx.Param))

    full, full_params = one_step(0)
    micro, micro_params = one_step(1)
    assert full["reward/mean"] == micro["reward/mean"]  # the same rollout
    np.testing.assert_allclose(micro["loss"], full["loss"], atol=1e-6)  # ~0: the advantages centre on 0
    np.testing.assert_allclose(micro["grad_norm"], full["grad_norm"], rtol=1e-5)
    for a, b in zip(full_params, micro_params):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="4 prompt rows do not split into micro-batches of 3"):
        one_step(3)


def test_reward_of_the_wrong_shape_is_named():
    def short_reward(examples, completions):
        return RewardResult(np.zeros(3), {}, {})

    trainer = Trainer(tiny_text_model(), trainer_config(), reward_fn=short_reward, stop_tokens=[STOP])
    with pytest.raises(ValueError, match=r"expected \[B \* G\] = \(32,\)"):
        trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=0)
