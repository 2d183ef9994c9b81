"""Split rule: questions sharing documents stay together, fractions are close, the result is deterministic."""

import collections

from m2io_jax.data import mramg, splits
from m2io_jax.data.demo import demo_root


def _manual_like():
    # 40 documents, 390 questions, some citing two documents (chains join components).
    return [(f"q{i}", [f"d{i % 40}"] + ([f"d{(i + 1) % 40}"] if i % 97 == 0 else [])) for i in range(390)]


def test_no_document_in_two_splits_and_fractions():
    qp = _manual_like()
    q_split, d_split = splits.assign_splits("manual", qp)
    for qid, prov in qp:
        assert {d_split[d] for d in prov} == {q_split[qid]}
    counts = collections.Counter(q_split.values())
    assert set(counts) == set(splits.SPLITS)
    assert 0.08 <= counts["test"] / 390 <= 0.2 and 0.08 <= counts["validation"] / 390 <= 0.2


def test_deterministic_and_salted():
    qp = _manual_like()
    assert splits.assign_splits("manual", qp) == splits.assign_splits("manual", list(qp))
    assert splits.assign_splits("manual", qp)[0] != splits.assign_splits("manual", qp, salt="other")[0]


def test_fractions_respected_on_demo():
    ds = mramg.load_dataset(demo_root(), "demo_web")
    q_split, _ = splits.assign_splits(
        ds.name, [(q.id, q.provenance) for q in ds.questions], splits.SplitFractions(validation=0.2, test=0.3))
    counts = collections.Counter(q_split.values())
    assert abs(counts["test"] / len(q_split) - 0.3) < 0.1
    assert abs(counts["validation"] / len(q_split) - 0.2) < 0.1
