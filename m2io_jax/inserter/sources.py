"""Where the inserter's questions, documents and images come from: an MRAMG-layout directory or TFDS builds.

Two sources, one result (`SplitDataset`: a dataset's questions with their split, its documents and images):
  mramg  the MRAMG reader (`m2io_jax.data.mramg`) on `data_dir` ("" = the embedded demo corpus), split by the
         split rule of the data config (`m2io_jax.data.splits`);
  tfds   the array_record files of `m2io_jax.data.tfds_builder` (`{name}_qa` and `{name}_corpus` under
         `tfds_dir`), read without TensorFlow; the split is the TFDS split the builder wrote. The corpus stores
         images encoded in the records; they are written once as PNG files under `image_dir`, since the
         prompt names each image by its file.

    datasets = load_datasets(config.data, image_dir=os.path.join(workdir, "images"))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib
from m2io_jax.data import splits as splits_lib
from m2io_jax.data.demo import demo_root

SOURCES = ("mramg", "tfds")


@dataclasses.dataclass(frozen=True)
class SplitDataset:
    """One dataset: its questions with their split, its documents (the retrieval corpus) and its images."""

    name: str
    questions: tuple[mramg.Question, ...]
    question_split: Mapping[str, str]  # question id -> "train" / "validation" / "test"
    documents: Mapping[str, mramg.Document]
    images: Mapping[str, mramg.ImageInfo]

    def questions_of(self, split: str) -> list[mramg.Question]:
        """The questions of `split`, in source order."""
        if split not in splits_lib.SPLITS:
            raise ValueError(f"split {split!r}: expected one of {splits_lib.SPLITS}")
        return [q for q in self.questions if self.question_split[q.id] == split]


def load_mramg(root: str, name: str, rule: splits_lib.SplitRule) -> SplitDataset:
    """Dataset `name` of the MRAMG-layout directory `root`, split by `rule`."""
    ds = mramg.load_dataset(root, name)
    question_split, _ = splits_lib.assign_splits(name, [(q.id, q.provenance) for q in ds.questions], rule)
    return SplitDataset(name=name, questions=tuple(ds.questions), question_split=question_split,
                        documents=ds.documents, images=ds.images)


def load_tfds(tfds_dir: str, name: str, image_dir: str) -> SplitDataset:
    """Dataset `name` from its TFDS builds `mramg/{name}_qa` and `mramg/{name}_corpus` under `tfds_dir`.

    Images are written to `image_dir/{name}/{image}.png` (kept when already there).
    """

    from m2io_jax.data import tfds_builder

    builds = {}
    for kind in tfds_builder.KINDS:
        builder = tfds_builder.Mramg(config=f"{name}_{kind}", data_dir=tfds_dir, file_format="array_record")
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"{builder.data_dir}: no TFDS build of mramg/{name}_{kind}; build it with "
                f"python -m m2io_jax.data.tfds_builder --builder_config={name}_{kind} --data_dir={tfds_dir}")
        builds[kind] = builder
    questions, question_split = [], {}
    for split in builds["qa"].info.splits:
        source = builds["qa"].as_data_source(split=split)
        for i in range(len(source)):
            question = _question_record(source[i], name)
            questions.append(question)
            question_split[question.id] = split
    documents, images = {}, {}
    os.makedirs(os.path.join(image_dir, name), exist_ok=True)
    corpus = builds["corpus"].as_data_source(split="corpus")
    for i in range(len(corpus)):
        record = corpus[i]
        doc = mramg.Document(id=_text(record["id"]), content=_text(record["content"]),
                             images=tuple(_texts(record["images_list"])), dataset=name)
        documents[doc.id] = doc
        entries = record["images"]
        for image_name, caption, pixels in zip(_texts(entries["name"]), _texts(entries["caption"]), entries["image"]):
            path = os.path.join(image_dir, name, f"{image_name}.png")
            if not os.path.isfile(path):
                _write_png(np.asarray(pixels), path)
            images[image_name] = mramg.ImageInfo(name=image_name, caption=caption, path=path)
    return SplitDataset(name=name, questions=tuple(questions), question_split=question_split, documents=documents,
                        images=images)


def load_datasets(data: ml_collections.ConfigDict, *, image_dir: str) -> list[SplitDataset]:
    """Every dataset of `data.datasets` from `data.source` (fields of the train config's `data` section).

    Fields read: source ("mramg" or "tfds"), data_dir (mramg; "" = the demo corpus), tfds_dir (tfds), split
    (the split rule, mramg only: a TFDS build carries the split it was built with).
    """
    if data.source not in SOURCES:
        raise ValueError(f"config.data.source={data.source!r}: expected one of {SOURCES}")
    if data.source == "tfds":
        if not data.tfds_dir:
            raise ValueError("config.data.source='tfds' needs config.data.tfds_dir (the TFDS data directory)")
        return [load_tfds(data.tfds_dir, name, image_dir) for name in data.datasets]
    root = data.data_dir or demo_root()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"config.data.data_dir={root}: no such directory (expected an MRAMG-layout download)")
    rule = splits_lib.SplitRule.from_config(data.split)
    return [load_mramg(root, name, rule) for name in data.datasets]


def corpus_texts(datasets: Sequence[SplitDataset]) -> list[str]:
    """Every text of the datasets (documents, questions, answers, captions): what a tokenizer is trained on."""
    texts = []
    for ds in datasets:
        texts += [doc.content for doc in ds.documents.values()]
        texts += [text for q in ds.questions for text in (q.question, q.answer or q.ground_truth)]
        texts += [info.caption for info in ds.images.values()]
    return texts


def _question_record(record: Mapping[str, object], dataset: str) -> mramg.Question:
    """A `mramg.Question` from one record of a `{name}_qa` TFDS build (fields of `tfds_builder._question_example`)."""
    answer = _text(record["answer"])
    spans = sentences_lib.split_sentences(answer)
    anchors = tuple(
        mramg.GoldAnchor(image=image, sentence_index=int(index), sentence=spans[index].text if index >= 0 else "")
        for image, index in zip(_texts(record["anchor_images"]), np.asarray(record["anchor_sentences"]).tolist()))
    return mramg.Question(
        id=_text(record["id"]), question=_text(record["question"]), provenance=tuple(_texts(record["provenance"])),
        ground_truth=_text(record["ground_truth"]), images=tuple(_texts(record["images"])), dataset=dataset,
        marker_form=_text(record["marker_form"]), answer=answer, anchors=anchors)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _texts(values: object) -> list[str]:
    return [_text(value) for value in values]


def _write_png(pixels: np.ndarray, path: str) -> None:
    from PIL import Image

    partial = f"{path}.partial"
    Image.fromarray(pixels.astype(np.uint8)).save(partial, format="PNG")
    os.replace(partial, path)
