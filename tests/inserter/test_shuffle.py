"""Candidate shuffling: deterministic per (seed, question), consistent renumbering, different across questions."""

import re

from m2io_jax.data import mramg
from m2io_jax.inserter import candidates as candidates_lib
from m2io_jax.inserter.shuffle import shuffle_candidates
from m2io_jax.retrieval.chunking import Chunk

IMAGES = {n: mramg.ImageInfo(n, f"caption of {n}", f"/x/{n}.png") for n in "abcdef"}
CHUNKS = [
    Chunk("d1", 0, "Alpha.<PIC> Beta.<PIC>", ("a", "b"), "x"),
    Chunk("d2", 0, "Gamma.<PIC> Delta.<PIC> Eps.<PIC>", ("c", "b", "d"), "x"),
    Chunk("d3", 0, "Zeta.<PIC> Eta.<PIC>", ("e", "f"), "x"),
]


def _candidates(qid):
    question = mramg.Question(qid, "?", ("d1",), "One. Two.", ("d", "b", "e"), "x")
    return candidates_lib.build_candidates(question, CHUNKS, IMAGES, max_images=10)


def _names_in_contexts(candidates):
    """Contexts with each <imgN> replaced by its image name: what the renumbering must not change."""
    return [re.sub(r"<(img\d+)>", lambda m: f"[{candidates.image_map[m.group(1)]}]", text)
            for text in candidates.contexts]


def test_renumbering_is_consistent_everywhere():
    before = _candidates("q1")
    after = shuffle_candidates(before, seed=0)
    assert list(after.image_map) == [f"img{i}" for i in range(1, 7)]
    assert sorted(after.image_map.values()) == sorted(before.image_map.values())
    assert after.image_map != before.image_map
    assert [after.image_map[t] for t in after.gold] == [before.image_map[t] for t in before.gold] == ["d", "b", "e"]
    assert after.captions == tuple(f"caption of {name}" for name in after.image_map.values())
    assert _names_in_contexts(after) == _names_in_contexts(before)
    assert after.contexts != before.contexts
    unchanged = ("question_id", "chunks", "gold_missing", "added_gold")
    assert [getattr(after, f) for f in unchanged] == [getattr(before, f) for f in unchanged]


def test_deterministic_for_a_seed_and_question():
    assert shuffle_candidates(_candidates("q1"), seed=0) == shuffle_candidates(_candidates("q1"), seed=0)
    assert shuffle_candidates(_candidates("q1"), seed=0) != shuffle_candidates(_candidates("q1"), seed=1)


def test_different_questions_get_different_orders():
    shuffled = [shuffle_candidates(_candidates(f"q{i}"), seed=0) for i in range(20)]
    orders = {tuple(c.image_map.values()) for c in shuffled}
    golds = {c.gold for c in shuffled}
    # Unshuffled, every one of these questions has gold (img4, img2, img5); 20 draws of 720 orders rarely collide.
    assert _candidates("q0").gold == ("img4", "img2", "img5")
    assert len(orders) >= 15 and len(golds) >= 15
