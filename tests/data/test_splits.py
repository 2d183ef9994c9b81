"""Split rule: questions sharing documents stay together, fractions are close, the result is deterministic
across processes (whatever Python's string hashing), and the defaults come from the package config."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

from m2io_jax.data import config as data_config
from m2io_jax.data import mramg, splits
from m2io_jax.data.demo import demo_root

_SPLIT_IN_SUBPROCESS = """
import json, sys
from m2io_jax.data import splits
with open(sys.argv[1]) as f:
    print(json.dumps(splits.assign_splits("manual", json.load(f)), sort_keys=True))
"""


def manual_like():
    # 40 documents, 390 questions, some citing two documents (chains join components).
    return [(f"q{i}", [f"d{i % 40}"] + ([f"d{(i + 1) % 40}"] if i % 97 == 0 else [])) for i in range(390)]


def test_no_document_in_two_splits_and_fractions():
    qp = manual_like()
    q_split, d_split = splits.assign_splits("manual", qp)
    for qid, prov in qp:
        assert {d_split[d] for d in prov} == {q_split[qid]}
    counts = collections.Counter(q_split.values())
    assert set(counts) == set(splits.SPLITS)
    assert 0.08 <= counts["test"] / 390 <= 0.2 and 0.08 <= counts["validation"] / 390 <= 0.2


def test_deterministic_across_processes_and_hash_seeds(tmp_path):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(manual_like()))
    outputs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run(
            [sys.executable, "-c", _SPLIT_IN_SUBPROCESS, str(questions)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=120,
        )
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    question_split, doc_split = json.loads(outputs[0])
    assert set(question_split.values()) == set(splits.SPLITS) and len(doc_split) == 40


def test_salted():
    qp = manual_like()
    other = dataclasses.replace(splits.SplitRule.default(), salt="other")
    assert splits.assign_splits("manual", qp)[0] != splits.assign_splits("manual", qp, other)[0]


def test_default_rule_is_the_package_config():
    section = data_config.get_config().split
    assert splits.SplitRule.default() == splits.SplitRule(section.validation, section.test, section.salt)


def test_fractions_respected_on_demo():
    ds = mramg.load_dataset(demo_root(), "demo_web")
    rule = dataclasses.replace(splits.SplitRule.default(), validation=0.2, test=0.3)
    q_split, _ = splits.assign_splits(ds.name, [(q.id, q.provenance) for q in ds.questions], rule)
    counts = collections.Counter(q_split.values())
    assert abs(counts["test"] / len(q_split) - 0.3) < 0.1
    assert abs(counts["validation"] / len(q_split) - 0.2) < 0.1
