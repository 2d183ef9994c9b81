"""TFDS builder: fixture (official layout) and demo corpus built as array_record and read back without TensorFlow."""

import importlib.util
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from m2io_jax.data import splits as splits_lib
from m2io_jax.data import tfds_builder


def _assert_no_tensorflow():
    assert importlib.util.find_spec("tensorflow") is None, "TensorFlow must not be installed"
    assert "tensorflow" not in sys.modules


def test_fixture_builds_and_reads_back(tmp_path, mramg_root):
    data_dir = str(tmp_path / "tfds")
    qa = tfds_builder.prepare("wit_qa", data_dir=data_dir, manual_dir=mramg_root)
    corpus = tfds_builder.prepare("wit_corpus", data_dir=data_dir, manual_dir=mramg_root)
    counts = {s: qa.info.splits[s].num_examples for s in qa.info.splits}
    assert counts == {"train": 2, "test": 2}  # two components; train is never left empty
    by_id = {}
    for split in counts:
        source = tfds.data_source("mramg/wit_qa", data_dir=data_dir, split=split)
        for i in range(len(source)):
            ex = source[i]
            by_id[ex["id"].decode()] = (split, ex)
    assert by_id["q2"][0] == by_id["q3"][0]  # share document 2
    assert by_id["q1"][0] == by_id["q4"][0]  # share document 1
    q4 = by_id["q4"][1]
    assert [x.decode() for x in q4["images"]] == ["wit_a", "wit_b"]
    assert q4["answer"].decode() == "A red kite. An old tree."
    np.testing.assert_array_equal(q4["anchor_sentences"], [0, 1])
    docs = corpus.as_data_source(split="corpus")
    doc = {docs[i]["id"].decode(): docs[i] for i in range(len(docs))}["1"]
    assert [x.decode() for x in doc["images_list"]] == ["wit_a", "wit_b"]
    image = doc["images"]["image"][0]
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    assert image[..., 0].mean() > 150  # the red JPEG
    assert doc["split"].decode() == by_id["q1"][0]
    _assert_no_tensorflow()


def test_split_fractions_configurable(tmp_path, mramg_root):
    rule = splits_lib.SplitRule(validation=0.0, test=0.5, salt="m2io")
    config = tfds_builder.MramgConfig(dataset="wit", kind="qa", name="wit_qa_half", rule=rule)
    builder = tfds_builder.prepare(config, data_dir=str(tmp_path / "tfds"), manual_dir=mramg_root)
    assert builder.info.splits["test"].num_examples == 2
    assert builder.info.splits["train"].num_examples == 2


# Questions per split and documents of each demo dataset under the default split rule (m2io_jax/data/demo/build.py).
DEMO_COUNTS = {
    "demo_web": ({"train": 79, "validation": 10, "test": 11}, 60),
    "demo_recipe": ({"train": 72, "validation": 9, "test": 9}, 30),
    "demo_manual": ({"train": 48, "validation": 12, "test": 12}, 12),
}


@pytest.mark.parametrize("name", sorted(DEMO_COUNTS))
def test_demo_builds_and_reads_back(tmp_path, name):
    data_dir = str(tmp_path / "tfds")
    tfds_builder.prepare(f"{name}_qa", data_dir=data_dir)
    tfds_builder.prepare(f"{name}_corpus", data_dir=data_dir)
    questions, documents = DEMO_COUNTS[name]
    assert {
        s: len(tfds.data_source(f"mramg/{name}_qa", data_dir=data_dir, split=s)) for s in splits_lib.SPLITS
    } == questions
    corpus = tfds.data_source(f"mramg/{name}_corpus", data_dir=data_dir, split="corpus")
    assert len(corpus) == documents
    ex = corpus[0]
    assert len(ex["images"]["image"]) == len(set(ex["images_list"])) >= 1
    assert ex["images"]["image"][0].shape == (96, 96, 3)
    _assert_no_tensorflow()
