"""The Flax encoder against sentence-transformers (torch) on the packaged MiniLM weights."""

import numpy as np
import pytest

from m2io_jax import models
from m2io_jax.models import bert


@pytest.fixture(scope="module")
def encoder(minilm_path):
    return models.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def st_model(minilm_path):
    import sentence_transformers
    return sentence_transformers.SentenceTransformer(minilm_path, device="cpu")


def _check_parity(encoder, st_model, texts):
    reference = st_model.encode(texts, batch_size=16, convert_to_numpy=True)
    ours = encoder.encode(texts, batch_size=16)
    assert ours.shape == reference.shape == (len(texts), 384)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"cosine vs sentence-transformers over {len(texts)} texts: min {cosine.min():.8f} mean {cosine.mean():.8f}")
    assert cosine.min() >= 0.99999, f"worst text {texts[int(cosine.argmin())]!r}: cosine {cosine.min()}"
    assert max(len(ids) for ids in encoder.tokenize(texts, 512)) > 256  # truncation was exercised


def test_loads_as_sentence_encoder(encoder):
    assert isinstance(encoder, bert.SentenceEncoder)
    assert encoder.model_type == "bert"
    assert encoder.pooling == bert.PoolingConfig(mode="mean", normalize=True, max_seq_length=256)
    assert encoder.dim == 384


def test_embeddings_match_sentence_transformers(encoder, st_model, sentences):
    _check_parity(encoder, st_model, sentences[:40] + sentences[-2:])


@pytest.mark.slow
def test_embeddings_match_sentence_transformers_all(encoder, st_model, sentences):
    _check_parity(encoder, st_model, sentences)


def test_encode_is_independent_of_batching(encoder, sentences):
    subset = sentences[:40]
    np.testing.assert_allclose(encoder.encode(subset, batch_size=7), encoder.encode(subset, batch_size=64), atol=2e-6)


def test_similarity_sanity(encoder):
    e = encoder.encode(["A cat sits on the mat.", "A kitten is on a rug.", "Stock markets fell today."])
    assert e[0] @ e[1] > 0.5 > 0.2 > e[0] @ e[2]


def test_empty_input(encoder):
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="not a single string"):
        encoder.encode("a single string")
