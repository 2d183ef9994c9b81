"""Batched KV-cache sampler: parity with transformers, log-prob consistency, shared prefill, buckets, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2io_jax import models, sampling
from m2io_jax import sharding as shd
from tests.conftest import TINY_QWEN2


def random_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab_size, n).tolist() for n in lengths]


def hf_greedy(reference, prompts, max_new_tokens):
    """transformers generate(do_sample=False) on a left-padded batch -> (new tokens, top-2 logit gap per step)."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), t), dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, dim=1).float()  # [B, N, V]
    top2 = scores.topk(2, dim=-1).values
    return out.sequences[:, t:].tolist(), (top2[..., 0] - top2[..., 1]).numpy()


@pytest.mark.parametrize("name", ["tied_gqa", "untied_mha"])
def test_greedy_matches_transformers_generate(tiny_qwen2, name):
    path, reference = tiny_qwen2[name]
    prompts = random_prompts(TINY_QWEN2[name]["vocab_size"], (5, 19, 11), seed=1)
    expected, gaps = hf_greedy(reference, prompts, 24)
    out = sampling.generate(models.from_pretrained(path), prompts, max_new_tokens=24)
    assert out.prompt_index == [0, 1, 2]
    for row, (ours, theirs) in enumerate(zip(out.tokens, expected)):
        near_tie = np.flatnonzero(gaps[row] < 1e-4)
        upto = int(near_tie[0]) + 1 if near_tie.size else len(theirs)
        assert upto >= 8, f"row {row}: near tie at step {upto - 1}; pick other weights"
        assert ours[:upto] == theirs[:upto], f"row {row}"


def teacher_forced_logprobs(model, prompt, completion, temperature):
    ids = jnp.asarray([prompt + completion], jnp.int32)
    t = ids.shape[1]
    hidden, _ = model.forward(model.embed(ids), positions=jnp.arange(t)[None], segment_ids=jnp.ones_like(ids))
    lp = model.token_logprobs(hidden[:, :-1], ids[:, 1:], temperature=temperature)
    return np.asarray(lp[0, len(prompt) - 1:])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 20, 0.9), (0.0, None, None)])
def test_logprobs_equal_teacher_forced_forward(tiny_qwen2, temperature, top_k, top_p):
    path, _ = tiny_qwen2["tied_gqa"]
    model = models.from_pretrained(path)
    prompts = random_prompts(TINY_QWEN2["tied_gqa"]["vocab_size"], (6, 13), seed=2)
    out = sampling.generate(model, prompts, max_new_tokens=10, num_samples=3, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=5)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1] and out.sample_index == [0, 1, 2] * 2
    for i, (tokens, logprobs) in enumerate(zip(out.tokens, out.logprobs)):
        assert len(tokens) == len(logprobs) == 10
        expected = teacher_forced_logprobs(model, prompts[out.prompt_index[i]], tokens, temperature or 1.0)
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)
    if temperature > 0:
        assert len({tuple(t) for t in out.tokens[:3]}) > 1, "samples of one prompt should differ"


def test_shared_prefill_equals_repeated_prompts(tiny_qwen2):
    path, _ = tiny_qwen2["untied_mha"]
    model = models.from_pretrained(path)
    prompts = random_prompts(TINY_QWEN2["untied_mha"]["vocab_size"], (9, 4, 15), seed=3)
    kwargs = dict(max_new_tokens=12, num_samples=4, temperature=1.0, top_p=0.95, seed=11)
    shared = sampling.generate(model, prompts, **kwargs)
    repeated = sampling.generate_repeated(model, prompts, **kwargs)
    assert shared.tokens == repeated.tokens
    assert shared.prompt_index == repeated.prompt_index and shared.sample_index == repeated.sample_index
    np.testing.assert_allclose(np.array(shared.logprobs), np.array(repeated.logprobs), atol=1e-5)


def test_samples_do_not_depend_on_batch_composition(tiny_qwen2):
    path, _ = tiny_qwen2["tied_gqa"]
    model = models.from_pretrained(path)
    prompts = random_prompts(TINY_QWEN2["tied_gqa"]["vocab_size"], (7, 40, 3), seed=4)
    kwargs = dict(max_new_tokens=8, num_samples=2, temperature=1.0, seed=2)
    alone = sampling.generate(model, prompts[:1], **kwargs)
    together = sampling.generate(model, prompts, **kwargs)
    assert together.tokens[:2] == alone.tokens


def test_stop_tokens_end_a_sample(tiny_qwen2):
    path, _ = tiny_qwen2["tied_gqa"]
    model = models.from_pretrained(path)
    prompts = random_prompts(TINY_QWEN2["tied_gqa"]["vocab_size"], (6, 9), seed=6)
    free = sampling.generate(model, prompts, max_new_tokens=16)
    stop = free.tokens[0][4]
    stopped = sampling.generate(model, prompts, max_new_tokens=16, stop_tokens=(stop,))
    for ours, full in zip(stopped.tokens, free.tokens):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert ours == full[:end]
    assert len(stopped.tokens[0]) == free.tokens[0].index(stop) + 1


def test_top_k_and_top_p_never_emit_a_masked_token():
    probs = np.array([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    filtered = np.asarray(sampling.filter_logits(logits[None], top_k=3, top_p=None))[0]
    assert np.isfinite(filtered).tolist() == [True] * 3 + [False] * 4
    filtered = np.asarray(sampling.filter_logits(logits[None], top_k=None, top_p=0.6))[0]
    assert np.isfinite(filtered).tolist() == [True, True] + [False] * 5  # 0.40 + 0.25 reaches 0.6
    filtered = np.asarray(sampling.filter_logits(logits[None], top_k=None, top_p=0.01))[0]
    assert np.isfinite(filtered).tolist() == [True] + [False] * 6  # the most likely token always stays
    # top-p after top-k renormalises: within the top 4 the mass is .4/.9, .25/.9, ... -> 0.44 + 0.28 >= 0.7.
    filtered = np.asarray(sampling.filter_logits(logits[None], top_k=4, top_p=0.7))[0]
    assert np.isfinite(filtered).tolist() == [True, True] + [False] * 5

    rows = 4096
    keys = jax.random.split(jax.random.key(0), rows)
    many = jnp.broadcast_to(logits, (rows, probs.size))
    for top_k, top_p, allowed in [(3, None, {0, 1, 2}), (None, 0.6, {0, 1}), (4, 0.8, {0, 1, 2})]:
        tokens, logp = sampling.choose_tokens(many, keys, jnp.int32(3), temperature=1.0, top_k=top_k, top_p=top_p)
        assert set(np.asarray(tokens).tolist()) == allowed
        np.testing.assert_allclose(np.asarray(logp), np.log(probs)[np.asarray(tokens)], atol=1e-6)


def test_same_buckets_compile_nothing_new(tiny_qwen2):
    path, _ = tiny_qwen2["wide_head_dim"]
    model = models.from_pretrained(path)
    vocab = TINY_QWEN2["wide_head_dim"]["vocab_size"]
    kwargs = dict(num_samples=2, temperature=1.0)
    sampling.generate(model, random_prompts(vocab, (5, 12, 3), seed=7), max_new_tokens=10, seed=0, **kwargs)
    before = sampling.compile_counts()
    # Other lengths, batch size, budget and seed inside the same buckets (P=16, B=4, N=16).
    out = sampling.generate(model, random_prompts(vocab, (16, 2, 9, 1), seed=8), max_new_tokens=16, seed=9, **kwargs)
    assert sampling.compile_counts() == before
    assert [len(t) for t in out.tokens] == [16] * 8


def test_a_new_bucket_compiles_one_prefill_and_one_decode(tiny_qwen2):
    """compile_counts() counts backend compilations (jax's compile events): one per program for new shapes,
    none when the same shapes run again."""
    path, _ = tiny_qwen2["tied_gqa"]
    model = models.from_pretrained(path)
    prompts = random_prompts(TINY_QWEN2["tied_gqa"]["vocab_size"], (3, 5), seed=13)
    kwargs = dict(max_new_tokens=5, num_samples=5, temperature=1.0, buckets=sampling.Buckets(new_token_lengths=(5,)))
    before = sampling.compile_counts()
    sampling.generate(model, prompts, **kwargs)
    after = sampling.compile_counts()
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("prefill", "decode")} == {"prefill": 1, "decode": 1}
    sampling.generate(model, prompts, seed=3, **kwargs)
    assert sampling.compile_counts() == after
    with pytest.raises(ValueError, match=r"max_new_tokens=6 exceeds the largest bucket 5"):
        sampling.generate(model, prompts, **{**kwargs, "max_new_tokens": 6})


def test_precompile_then_generate_compiles_nothing(tiny_qwen2):
    path, _ = tiny_qwen2["untied_mha"]
    model = models.from_pretrained(path)
    kwargs = dict(num_samples=3, temperature=0.9, top_k=7)
    sampling.precompile(model, batch_size=2, prompt_length=20, max_new_tokens=12, num_stop_tokens=1, **kwargs)
    before = sampling.compile_counts()
    prompts = random_prompts(TINY_QWEN2["untied_mha"]["vocab_size"], (17, 30), seed=12)
    out = sampling.generate(model, prompts, max_new_tokens=9, stop_tokens=(5,), **kwargs)
    assert sampling.compile_counts() == before
    assert len(out.tokens) == 6


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "non-empty list"),
    ([[1, 2], []], {}, r"prompts\[1\] is empty"),
    ([[1, 2, 999]], {}, r"prompts\[0\]\[2\] = 999 is outside the vocabulary"),
    ([[3, -1]], {}, "outside the vocabulary"),
    ([[1] * 500], {"max_new_tokens": 20}, "max_position_embeddings=512"),
    ([[1, 2]], {"top_p": 1.5}, "top_p"),
    ([[1, 2]], {"stop_tokens": (512,)}, "stop token 512"),
    ([[1, 2]], {"images": [np.zeros((4, 4))]}, "text-only"),
])
def test_bad_input_raises_before_compiling(tiny_qwen2, prompts, kwargs, message):
    path, _ = tiny_qwen2["tied_gqa"]
    model = models.from_pretrained(path)
    before = sampling.compile_count()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling.generate(model, prompts, **kwargs)
    assert sampling.compile_count() == before


def test_sharded_sampling_matches_single_device(tiny_qwen2):
    path, _ = tiny_qwen2["tied_gqa"]
    prompts = random_prompts(TINY_QWEN2["tied_gqa"]["vocab_size"], (6, 14, 3, 9), seed=9)
    kwargs = dict(max_new_tokens=10, num_samples=2, temperature=1.0, seed=4)
    single = sampling.generate(models.from_pretrained(path), prompts, **kwargs)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = models.from_pretrained(path, mesh=mesh)
    assert "fsdp" in str(model.layers.gate_proj[...].sharding.spec)
    _, params, found = sampling.sampling_params(model)
    assert found is mesh
    for leaf in jax.tree.leaves(params):
        assert "fsdp" not in str(leaf.sharding.spec)
    sharded = sampling.generate(model, prompts, **kwargs)
    assert sharded.tokens == single.tokens
    np.testing.assert_allclose(np.array(sharded.logprobs), np.array(single.logprobs), atol=1e-5)
