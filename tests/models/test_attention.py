"""The attention layouts of `m2io_jax.models.attention`: the Pallas kernels (interpret mode on CPU) against the
XLA einsum reference, outputs and gradients, on shapes that reach the kernels' edge cases: left padding and
packed segments, prompts with padding, GQA, several key tiles per prompt and per sample, every decode slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2io_jax.models import attention
from m2io_jax.models.kernels import decode, splash

B, H, KV, HD = 2, 4, 2, 16


def normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def assert_close(actual, expected, atol=2e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=1e-5)


def test_impls_and_check():
    assert attention.ATTENTION_IMPLS == ("xla", "pallas")
    with pytest.raises(ValueError, match=r"where: attention_impl='flash'; expected one of xla, pallas"):
        attention.check_attention_impl("flash", "where")


@pytest.fixture(scope="module")
def causal_case():
    rng = np.random.default_rng(0)
    t = 12
    q, k, v = normal(rng, B, t, H, HD), normal(rng, B, t, KV, HD), normal(rng, B, t, KV, HD)
    # Row 0: 3 tokens of left padding then one sequence; row 1: three packed sequences.
    segments = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 4 + [2] * 5 + [3] * 3], jnp.int32)
    real = (segments != 0)[:, :, None, None]  # outputs of padding queries are not attention of anything
    return q, k, v, attention.CausalSegments(segments, segments, jnp.zeros((), jnp.int32)), real


def test_causal_splash_equals_xla(causal_case):
    q, k, v, segments, real = causal_case
    expected = attention.grouped_attention(q, k, v, segments, impl="xla")
    actual = jax.jit(lambda q, k, v: attention.grouped_attention(q, k, v, segments, impl="pallas"))(q, k, v)
    assert actual.shape == expected.shape
    assert_close(jnp.where(real, actual, 0), jnp.where(real, expected, 0))


def test_causal_splash_gradients_equal_xla(causal_case):
    q, k, v, segments, real = causal_case
    weights = normal(np.random.default_rng(1), *q.shape)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.where(real, weights * attention.grouped_attention(q, k, v, segments,
                                                                                           impl=impl), 0))

    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    actual = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    for a, e in zip(actual, expected):
        assert float(jnp.abs(e).max()) > 0
        assert_close(a, e)


def test_pallas_refuses_fewer_queries_than_keys(causal_case):
    q, k, v, _, _ = causal_case
    segments = attention.CausalSegments(jnp.ones((B, 1), jnp.int32), jnp.ones((B, 12), jnp.int32), jnp.int32(5))
    with pytest.raises(ValueError, match=r"grouped_attention\(impl='pallas'\): 1 queries against 12 keys"):
        attention.grouped_attention(q[:, :1], k, v, segments, impl="pallas")


def test_shared_prefix_splash_equals_xla_with_gradients():
    rng = np.random.default_rng(2)
    g, n, p = 3, 5, 7
    q = normal(rng, B, g, n, H, HD)
    pk, pv = normal(rng, B, p, KV, HD), normal(rng, B, p, KV, HD)
    sk, sv = normal(rng, B, g, n, KV, HD), normal(rng, B, g, n, KV, HD)
    prefix_mask = jnp.asarray([[False, False] + [True] * 5, [True] * 7])
    weights = normal(rng, B, g, n, H, HD)

    def run(impl):
        return lambda *a: attention.shared_prefix_attention(a[0], a[1], a[2], prefix_mask, a[3], a[4], impl=impl)

    args = (q, pk, pv, sk, sv)
    assert_close(jax.jit(run("pallas"))(*args), run("xla")(*args))
    expected = jax.grad(lambda *a: jnp.sum(weights * run("xla")(*a)), argnums=tuple(range(5)))(*args)
    actual = jax.jit(jax.grad(lambda *a: jnp.sum(weights * run("pallas")(*a)), argnums=tuple(range(5))))(*args)
    for a, e in zip(actual, expected):
        assert_close(a, e)


def test_shared_prefix_mask_blocks():
    mask = splash.SharedPrefixMask((8, 16), prefix=3, samples=2, length=3)
    dense = mask[slice(None), slice(None)]
    # Query 4 (sample 1, token 1) sees the prompt (keys 0-2) and keys 6-7 (its sample's tokens 0-1).
    assert np.flatnonzero(dense[4]).tolist() == [0, 1, 2, 6, 7]
    assert np.flatnonzero(dense[0]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(dense[7]).tolist() == list(range(9))  # a padding query: every real key
    assert not dense[:, 9:].any()
    assert np.array_equal(mask[slice(2, 6), slice(4, 12)], dense[2:6, 4:12])
    same = splash.SharedPrefixMask((8, 16), 3, 2, 3)
    assert mask == same and hash(mask) == hash(same) and mask != splash.SharedPrefixMask((8, 16), 3, 2, 2)
    with pytest.raises(ValueError, match=r"shape \(4, 16\) cannot hold 2 completions of 3 tokens"):
        splash.SharedPrefixMask((4, 16), 3, 2, 3)


def test_bidirectional_splash_equals_reference():
    rng = np.random.default_rng(3)
    n, h, length = 3, 2, 20
    q, k, v = (normal(rng, n, h, length, HD) for _ in range(3))
    valid = jnp.asarray(rng.random((n, length)) < 0.7).at[:, 0].set(True)
    scores = jnp.einsum("nhqd,nhkd->nhqk", q, k)
    expected = jnp.einsum("nhqk,nhkd->nhqd", jax.nn.softmax(jnp.where(valid[:, None, None], scores, -1e30)), v)
    actual = jax.jit(splash.bidirectional_attention)(q, k, v, valid)
    keep = valid[:, None, :, None]
    assert_close(jnp.where(keep, actual, 0), jnp.where(keep, expected, 0))


@pytest.fixture(scope="module")
def decode_case():
    rng = np.random.default_rng(4)
    layers, g, p, s = 3, 3, 24, 16
    q = normal(rng, B, g, H, HD)
    pk, pv = normal(rng, layers, B, p, KV, HD), normal(rng, layers, B, p, KV, HD)
    sk, sv = normal(rng, layers, B, g, s, KV, HD), normal(rng, layers, B, g, s, KV, HD)
    prefix_mask = jnp.asarray([[False] * 10 + [True] * 14, [True] * 24])
    return q, pk, pv, prefix_mask, sk, sv


@pytest.mark.parametrize("layer, slot, span, block", [(0, 0, 8, 512), (1, 5, 8, 8), (2, 13, 16, 8), (2, 3, 16, 512)])
def test_decode_kernel_equals_xla(decode_case, layer, slot, span, block):
    """block 8: three prefix tiles and two suffix tiles per sample (the online softmax across tiles)."""
    q, pk, pv, prefix_mask, sk, sv = decode_case
    expected = attention.shared_prefix_decode(q, pk, pv, prefix_mask, sk, sv, jnp.int32(layer), jnp.int32(slot),
                                              span=span, impl="xla")
    actual = jax.jit(lambda q, i, s: decode.shared_prefix_decode(q, pk, pv, prefix_mask, sk, sv, i, s, span=span,
                                                                 block=block))(q, jnp.int32(layer), jnp.int32(slot))
    assert actual.shape == q.shape
    assert_close(actual, expected)


def test_decode_reads_only_visible_suffix_slots(decode_case):
    """Keys past the slot (not yet written in a real decode) must not change the result."""
    q, pk, pv, prefix_mask, sk, sv = decode_case
    noisy = sk.at[:, :, :, 6:].set(100.0)

    def run(k):
        return attention.shared_prefix_decode(q, pk, pv, prefix_mask, k, sv, jnp.int32(1), jnp.int32(5), span=16,
                                              impl="pallas")

    assert_close(run(noisy), run(sk))
    assert float(jnp.abs(run(sk.at[:, :, :, 5].set(100.0)) - run(sk)).max()) > 1e-3


def test_key_block():
    assert decode.key_block(1024) == 512
    assert decode.key_block(24, 8) == 8
    assert decode.key_block(40, 512) == 40
    assert decode.key_block(7) == 7  # no multiple of 8 divides it: one tile


def test_kernels_run_per_shard_under_a_mesh(causal_case, decode_case):
    """Under a mesh each device runs the kernels on its rows and key/value heads (`shard_map`)."""
    from m2io_jax.sharding import make_mesh

    q, k, v, segments, real = causal_case
    dq, pk, pv, prefix_mask, sk, sv = decode_case
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])

    def both(impl):
        causal = attention.grouped_attention(q, k, v, segments, impl=impl)
        step = attention.shared_prefix_decode(dq, pk, pv, prefix_mask, sk, sv, jnp.int32(1), jnp.int32(4), span=8,
                                              impl=impl)
        return jnp.where(real, causal, 0), step

    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda: both("pallas"))()
        assert "shard_map" in str(jax.make_jaxpr(lambda: both("pallas"))())
    for a, e in zip(sharded, both("xla")):
        assert_close(a, e)
