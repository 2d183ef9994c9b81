"""Fixtures for the encoder tests: the packaged MiniLM checkpoint and a varied sentence set."""

import random

import pytest

from m2io_jax.models import bert

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


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        return bert.default_encoder_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return _sentences()
