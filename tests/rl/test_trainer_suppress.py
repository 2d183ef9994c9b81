"""Suppressed tokens (e.g. `<|image_pad|>`) are never sampled, greedy or not, even when their logit is the
largest, and the trainer's log-probs mask them exactly as the sampler does."""

import jax.numpy as jnp
import numpy as np

from m2io_jax import sampling
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from tests.rl.trainer_helpers import PROMPTS, STOP, tiny_text_model, trainer_config

DOMINANT = 5


def dominant_token_model(token: int):
    """A tiny untied Qwen2 whose logit of `token` is far above every other at every position.

    Embedding dimension 0 holds 100 for every token, so the final hidden state's dimension 0 is large and
    positive; the LM head reads only dimension 0 for `token`, nothing of it for the others.
    """
    model = tiny_text_model(tie_word_embeddings=False)
    model.embed_tokens.value = model.embed_tokens.value.at[:, 0].set(100.0)
    model.lm_head.value = model.lm_head.value.at[0, :].set(0.0).at[0, token].set(50.0)
    return model


def test_suppressed_token_with_the_largest_logit_is_never_sampled():
    model = dominant_token_model(DOMINANT)
    unsuppressed = sampling.generate(model, PROMPTS, max_new_tokens=8)
    assert all(t == DOMINANT for row in unsuppressed.tokens for t in row)  # its logit is indeed the maximum

    inputs = model.prepare_prompts(PROMPTS, None, rows=4, length=16)
    for temperature in (0.0, 1.0):
        out = sampling.generate_prepared(model, inputs, num_prompts=4, max_new_tokens=8, num_samples=4,
                                         temperature=temperature, suppress_tokens=[DOMINANT], seed=3)
        emitted = {t for row in out.tokens for t in row}
        assert DOMINANT not in emitted and len(out.tokens) == 16, temperature
    greedy = sampling.generate(model, PROMPTS, max_new_tokens=8, suppress_tokens=[DOMINANT])
    assert not any(DOMINANT in row for row in greedy.tokens)


def test_trainer_logprobs_mask_suppressed_tokens_like_the_sampler():
    model = dominant_token_model(DOMINANT)
    inputs = model.prepare_prompts(PROMPTS, None, rows=4, length=16)
    out = sampling.generate_prepared(model, inputs, num_prompts=4, max_new_tokens=8, num_samples=2,
                                     temperature=1.0, suppress_tokens=[DOMINANT], seed=0, stop_tokens=[])
    completions = jnp.asarray(out.tokens).reshape(4, 2, 8)
    masked = model.completion_logprobs(inputs, completions, temperature=1.0, suppress_tokens=[DOMINANT])
    unmasked = model.completion_logprobs(inputs, completions, temperature=1.0)
    sampled = np.asarray(out.logprobs).reshape(4, 2, 8)
    np.testing.assert_allclose(masked, sampled, atol=1e-4)
    assert np.all(np.asarray(unmasked) < -10)  # without the mask every sampled token looks impossible


def test_grpo_rollouts_never_emit_a_suppressed_token():
    seen = []

    def reward(examples, completions):
        seen.extend(completions)
        return RewardResult(np.array([float(len(c)) for c in completions]), {}, {})

    trainer = Trainer(dominant_token_model(DOMINANT), trainer_config(), reward_fn=reward, stop_tokens=[STOP],
                      suppress_tokens=[DOMINANT])
    metrics = trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=0)
    assert len(seen) == 32 and not any(DOMINANT in c for c in seen)
    assert metrics["logprob_diff/sampler_vs_trainer"] < 1e-4
