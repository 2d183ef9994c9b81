"""Candidates (m2io_jax.inserter.candidates): <imgN> numbering by first appearance, captions, gold ids, cap,
missed-gold policy, and the config's candidates section."""

import pytest

from m2io_jax.data import config as data_config
from m2io_jax.data import mramg
from m2io_jax.inserter import candidates
from m2io_jax.retrieval.chunking import Chunk

IMAGES = {n: mramg.ImageInfo(n, f"cap {n}", f"/x/{n}.png") for n in "abcdefg"}


def _q(images, qid="q1", answer="First.<PIC> Second.<PIC>"):
    q = mramg.Question(qid, "?", ("d1",), answer, tuple(images), "x")
    return mramg._with_anchors(q, "f", 1, mramg._Problems(mramg.LoadReport("x"), False))


C1 = Chunk("d1", 0, "Alpha.<PIC> Beta.<PIC>", ("b", "a"), "x")
C2 = Chunk("d2", 0, "Gamma.<PIC> Delta.<PIC>", ("a", "c"), "x")
C3 = Chunk("d1", 1, "Eps.<PIC>", ("d",), "x")


def test_numbering_context_captions_gold():
    cands = candidates.build_candidates(_q(["a", "c"]), [C1, C2], IMAGES, max_images=10)
    assert cands.image_map == {"img1": "b", "img2": "a", "img3": "c"}
    assert cands.contexts == ("Alpha.<img1> Beta.<img2>", "Gamma.<img2> Delta.<img3>")
    assert cands.context_text.splitlines()[0] == "[context_1] Alpha.<img1> Beta.<img2>"
    assert cands.caption_text.splitlines() == ["[img1_caption] cap b", "[img2_caption] cap a", "[img3_caption] cap c"]
    assert cands.gold == ("img2", "img3") and cands.gold_missing == ()
    assert candidates.render_gold(_q(["a", "c"]), cands) == "First.<img2> Second.<img3>"


def test_cap_drops_later_images_and_their_markers():
    cands = candidates.build_candidates(_q(["a", "c"]), [C1, C2], IMAGES, max_images=2)
    assert cands.image_map == {"img1": "b", "img2": "a"}
    assert cands.contexts[1] == "Gamma.<img2> Delta."
    assert cands.gold == ("img2",) and cands.gold_missing == ("c",)


def test_missed_gold_added_only_when_asked():
    q = _q(["d"], answer="Eps.<PIC>")
    evaluation = candidates.build_candidates(q, [C1, C2], IMAGES, max_images=3, extra_chunks=[C3])
    assert evaluation.gold_missing == ("d",) and evaluation.added_gold == ()
    training = candidates.build_candidates(q, [C1, C2], IMAGES, max_images=3, extra_chunks=[C3], add_gold=True)
    assert training.added_gold == ("d",) and training.gold_missing == ()
    assert C3 in training.chunks and len(training.image_map) == 3  # cap kept: a non-gold image made room
    assert "d" in training.image_map.values()


@pytest.mark.parametrize("policy, split, expected", [
    ("train", "train", True), ("train", "test", False), ("train", "validation", False),
    ("never", "train", False), ("always", "test", True)])
def test_missed_gold_policy(policy, split, expected):
    assert candidates.add_missed_gold(policy, split) is expected


def test_missed_gold_policy_rejects_unknown():
    with pytest.raises(ValueError, match="'sometimes'"):
        candidates.add_missed_gold("sometimes", "train")


@pytest.mark.parametrize("split, added", [("train", ("d",)), ("test", ())])
def test_candidates_for_split_reads_the_config(split, added):
    settings = data_config.get_config().candidates
    settings.max_images = 2
    cands = candidates.candidates_for_split(_q(["d"], answer="Eps.<PIC>"), [C1, C2], IMAGES, split=split,
                                            settings=settings, extra_chunks=[C3])
    assert len(cands.image_map) == 2
    assert cands.added_gold == added
