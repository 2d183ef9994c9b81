"""InsertionExample from a question: marker-free answer, gold anchors mapped to candidate ids, or None."""

from m2io_jax.data import mramg
from m2io_jax.inserter import candidates as candidates_lib
from m2io_jax.inserter.example import example_from_question
from m2io_jax.inserter.formats import Placement
from m2io_jax.retrieval.chunking import Chunk

IMAGES = {n: mramg.ImageInfo(n, f"cap {n}", f"/x/{n}.png") for n in "abcd"}
CHUNKS = [Chunk("d1", 0, "Alpha.<PIC> Beta.<PIC>", ("b", "a"), "x"), Chunk("d2", 0, "Gamma.<PIC>", ("c",), "x")]


def _question(ground_truth, images):
    q = mramg.Question("q1", "How?", ("d1",), ground_truth, tuple(images), "x")
    return mramg._with_anchors(q, "f", 1, mramg._Problems(mramg.LoadReport("x"), False))


def _example(ground_truth, images):
    question = _question(ground_truth, images)
    return example_from_question(question, candidates_lib.build_candidates(question, CHUNKS, IMAGES, max_images=5))


def test_gold_anchors_follow_the_candidate_ids():
    example = _example("One.<PIC> Two. Three.<PIC>", ["c", "a"])  # ids: b=img1, a=img2, c=img3
    assert example.answer == "One. Two. Three." and example.sentences == ("One.", "Two.", "Three.")
    assert example.gold == ("img3", "img2") and example.candidate_ids == ("img1", "img2", "img3")
    assert example.gold_anchors == (Placement("img3", 0), Placement("img2", 2))


def test_gold_missing_from_the_candidates_is_left_out():
    example = _example("One.<PIC> Two.<PIC>", ["d", "a"])
    assert example.gold == ("img2",) and example.gold_anchors == (Placement("img2", 1),)


def test_anchors_unknown_without_markers_and_empty_without_gold():
    assert _example("One. Two.", ["a"]).gold_anchors is None
    assert _example("One. Two.", []).gold_anchors == ()
