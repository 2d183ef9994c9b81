"""BERTScore with the Flax MiniLM against the `bert_score` package (torch) on the same weights.

The MiniLM package is a declared test dependency: without it these tests fail, they do not skip.
"""

import numpy as np
import pytest

from m2io_jax.eval import bertscore
from m2io_jax.models import sentence_encoder

CANDIDATES = [
    "The cat sat on the mat.",
    "Preheat the oven to 200 degrees and bake for 20 minutes.",
    "Hold the power button for ten seconds to reset the router.",
    "Paris is the capital of France.",
    "An answer with an image placeholder <img1> in the middle.",
    "Completely unrelated words: banana telescope quantum.",
    "Our method improves recall@10 by 4.2 points over the baseline, as Table 2 shows. " * 6,
]
REFERENCES = [
    "A cat was sitting on the mat.",
    "Bake it at 200 degrees for twenty minutes after preheating the oven.",
    "To reset the router, press and hold the power button for 10 seconds.",
    "France's capital city is Paris.",
    "The answer has an image in the middle.",
    "A recipe for chocolate cake.",
    "The proposed approach gains 4.2 recall@10 points (Table 2). " * 5,
]


@pytest.fixture(scope="module")
def encoder():
    return sentence_encoder.load_encoder()


@pytest.mark.parametrize("layer,idf", [(6, False), (3, False), (6, True)])
def test_matches_bert_score_package(encoder, layer, idf):
    import bert_score
    scorer = bert_score.BERTScorer(
        model_type=sentence_encoder.default_encoder_path(), num_layers=layer, idf=idf,
        idf_sents=REFERENCES if idf else None,
        nthreads=0,
    )
    expected = [t.numpy() for t in scorer.score(CANDIDATES, REFERENCES)]
    ours = bertscore.bert_score(CANDIDATES, REFERENCES, encoder, layer=layer, idf=idf)
    for name, got, want in zip("PRF", ours, expected):
        print(f"layer {layer} idf {idf} {name}: max |ours - bert_score| = {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_empty_texts_score_zero(encoder):
    # bert_score 0.3.13 itself crashes on "" under transformers 5 (no build_inputs_with_special_tokens);
    # its documented behaviour is raw scores of 0 for an empty candidate or reference.
    p, r, f = bertscore.bert_score(["", "text", "  "], ["text", "", "text"], encoder)
    assert p.tolist() == r.tolist() == f.tolist() == [0.0, 0.0, 0.0]


def test_identical_texts_score_one_and_baseline(encoder):
    p, r, f = bertscore.bert_score(["same words here"], ["same words here"], encoder)
    np.testing.assert_allclose([p[0], r[0], f[0]], 1.0, atol=1e-6)
    _, _, f_rescaled = bertscore.bert_score(["a dog"], ["a cat"], encoder, baseline=(0.5, 0.5, 0.5))
    _, _, f_raw = bertscore.bert_score(["a dog"], ["a cat"], encoder)
    np.testing.assert_allclose(f_rescaled, (f_raw - 0.5) / 0.5, atol=1e-9)


def test_length_mismatch_and_empty(encoder):
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        bertscore.bert_score(["a", "b"], ["a"], encoder)
    assert all(x.shape == (0,) for x in bertscore.bert_score([], [], encoder))


def test_idf_weights():
    weights = bertscore.idf_weights([[1, 2, 3], [1, 3, 3]])
    assert weights[1] == pytest.approx(0.0)
    assert weights[2] == pytest.approx(np.log(3 / 2))
    assert weights[99] == pytest.approx(np.log(3))
