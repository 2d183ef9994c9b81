"""TFDS builder for MRAMG-Bench and the demo corpus: array_record files that read back without TensorFlow.

Configs, two per dataset (`{name}` in `mramg.DATASETS` + `demo.DEMO_DATASETS`):
  `{name}_qa`      splits train / validation / test (our split rule, `m2io_jax.data.splits`; a split with no
                   question, possible only for tiny datasets, is not written); one example per
                   question: id, question, provenance, ground_truth, answer (markers removed), images (gold
                   names, in order), marker_form, anchor_images / anchor_sentences (gold anchors).
  `{name}_corpus`  split `corpus`; one example per document: id, content, images_list, split (the split of the
                   questions citing it, or "none"), and `images`: name, caption and encoded image of each
                   entry of images_list whose file exists (missing files are logged, listed in images_list).

Build (no network; the MRAMG files must be downloaded by hand, see MANUAL_DOWNLOAD_INSTRUCTIONS):

    tfds_builder.prepare("recipe_qa", data_dir=OUT, manual_dir=MRAMG_DIR)
    source = tfds.data_source("mramg/recipe_qa", data_dir=OUT, split="train")

or from the command line (`--builder_config` names a TFDS builder config, as `tfds build --config` does; it
is repeatable):

    python -m m2io_jax.data.tfds_builder --builder_config=recipe_qa --builder_config=recipe_corpus \
        --data_dir=OUT --manual_dir=MRAMG_DIR

Demo configs read the embedded demo corpus and need no manual directory. Images are stored encoded
(JPEG/PNG bytes as found, or re-encoded to RGB PNG when the file is another format or mode), which is what
`tfds.features.Image` accepts without TensorFlow; readers decode them with PIL.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from m2io_jax import cli
from m2io_jax.data import mramg
from m2io_jax.data import splits as splits_lib
from m2io_jax.data.demo import DEMO_DATASETS, demo_root

KINDS = ("qa", "corpus")


class MramgConfig(tfds.core.BuilderConfig):
    """One dataset, as questions (`qa`) or documents (`corpus`), with the split rule to apply.

    `rule` defaults to `SplitRule.default()`, the package config's `split` section; a config built with another
    rule needs its own `name`, since TFDS keeps one build per name and version.
    """

    def __init__(self, *, dataset: str, kind: str, rule: splits_lib.SplitRule | None = None, **kwargs):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        kwargs.setdefault("name", f"{dataset}_{kind}")
        kwargs.setdefault(
            "description",
            f"MRAMG-format dataset {dataset!r}: {'questions' if kind == 'qa' else 'documents with images'}",
        )
        super().__init__(**kwargs)
        self.dataset = dataset
        self.kind = kind
        self.rule = rule or splits_lib.SplitRule.default()


class Mramg(tfds.core.GeneratorBasedBuilder):
    """MRAMG-Bench (arXiv 2502.04176) and the m2io_jax demo corpus."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "QA and corpus configs; hash-of-provenance train/validation/test split."}
    BUILDER_CONFIGS = [MramgConfig(dataset=d, kind=k) for d in mramg.DATASETS + DEMO_DATASETS for k in KINDS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download MRAMG-Bench from the Hugging Face dataset MRAMG/MRAMG-Bench (files doc_{name}.jsonl,
    {name}_mqa.jsonl and IMAGE.zip) and unzip IMAGE.zip in the same directory, giving
      manual_dir/doc_{name}.jsonl, manual_dir/{name}_mqa.jsonl,
      manual_dir/IMAGE/IMAGE/images_info/{name}_imgs_collection.json,
      manual_dir/IMAGE/IMAGE/images/{NAME}/<image files>
    (IMAGE/images/..., images/... and images_info/... are accepted too; see m2io_jax.data.mramg).
    Demo configs (demo_*) need no download.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        text_seq = tfds.features.Sequence(tfds.features.Text())
        if self.builder_config.kind == "qa":
            features = tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "question": tfds.features.Text(),
                "provenance": text_seq,
                "ground_truth": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "images": text_seq,
                "marker_form": tfds.features.Text(),
                "anchor_images": text_seq,
                "anchor_sentences": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
            })
        else:
            features = tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "content": tfds.features.Text(),
                "images_list": text_seq,
                "split": tfds.features.Text(),
                "images": tfds.features.Sequence({
                    "name": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(None, None, 3)),
                }),
            })
        return self.dataset_info_from_configs(features=features, homepage="https://huggingface.co/datasets/MRAMG/MRAMG-Bench")

    def _source_root(self, dl_manager) -> str:
        if self.builder_config.dataset in DEMO_DATASETS:
            return demo_root()
        return os.fspath(dl_manager.manual_dir)

    def _split_generators(self, dl_manager):
        config = self.builder_config
        ds = mramg.load_dataset(self._source_root(dl_manager), config.dataset)
        if ds.report.problems:
            logging.warning("%s", ds.report.summary())
        question_split, doc_split = splits_lib.assign_splits(
            config.dataset, [(q.id, q.provenance) for q in ds.questions], config.rule
        )
        if config.kind == "qa":
            present = [s for s in splits_lib.SPLITS if s in question_split.values()]
            if len(present) < len(splits_lib.SPLITS):
                logging.warning(
                    "%s: splits %s are empty and not written",
                    config.dataset,
                    sorted(set(splits_lib.SPLITS) - set(present)),
                )
            return {split: self._generate_examples(ds, question_split, split) for split in present}
        return {"corpus": self._generate_examples(ds, doc_split, None)}

    def _generate_examples(self, ds: mramg.MramgDataset, split_of: dict[str, str], split: str | None):
        """Questions of `split` (qa), or every document with its split (corpus)."""
        if self.builder_config.kind == "qa":
            for q in ds.questions:
                if split_of[q.id] == split:
                    yield q.id, _question_example(q)
            return
        missing = 0
        for doc in ds.documents.values():
            example = _document_example(doc, ds.images, split_of.get(doc.id, splits_lib.UNASSIGNED))
            missing += len(set(doc.images)) - len(example["images"])
            yield doc.id, example
        if missing:
            logging.warning(
                "%s: %d images of images_list have no readable file (see the reader's report)", ds.name, missing
            )


def _question_example(q: mramg.Question) -> dict:
    return {
        "id": q.id,
        "question": q.question,
        "provenance": list(q.provenance),
        "ground_truth": q.ground_truth,
        "answer": q.answer,
        "images": list(q.images),
        "marker_form": q.marker_form,
        "anchor_images": [a.image for a in q.anchors],
        "anchor_sentences": np.asarray([a.sentence_index for a in q.anchors], np.int32),
    }


def _document_example(doc: mramg.Document, images: dict[str, mramg.ImageInfo], split: str) -> dict:
    present = []
    for name in dict.fromkeys(doc.images):
        info = images.get(name)
        encoded = _encoded_rgb(info.path) if info and info.path else None
        if encoded is not None:
            present.append({"name": name, "caption": info.caption, "image": encoded})
    return {"id": doc.id, "content": doc.content, "images_list": list(doc.images), "split": split, "images": present}


def _encoded_rgb(path: str) -> bytes | None:
    """The file's bytes when it is an RGB JPEG/PNG; otherwise the image re-encoded as RGB PNG; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format in ("JPEG", "PNG") and image.mode == "RGB":
                with open(path, "rb") as f:
                    return f.read()
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, UnidentifiedImageError):
        return None


def download_config(manual_dir: str | None = None) -> tfds.download.DownloadConfig:
    """A DownloadConfig pointing at the hand-downloaded MRAMG directory."""
    return tfds.download.DownloadConfig(manual_dir=manual_dir)


def prepare(config: str | MramgConfig, *, data_dir: str, manual_dir: str | None = None) -> Mramg:
    """Builds `config` into `data_dir` (no-op when already built) and returns the builder."""
    builder = Mramg(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=download_config(manual_dir))
    return builder


_BUILDER_CONFIGS = flags.DEFINE_multi_string(
    "builder_config", None, "TFDS builder config to build, e.g. demo_web_qa or recipe_corpus; repeatable")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to write")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "MRAMG-Bench download directory (not needed for demo_*)")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_BUILDER_CONFIGS, _DATA_DIR)
    configs = {c.name: c for c in Mramg.BUILDER_CONFIGS}
    for name in _BUILDER_CONFIGS.value:
        if name not in configs:
            raise cli.UserError(f"--builder_config={name}: unknown builder config; expected one of {sorted(configs)}")
        if configs[name].dataset not in DEMO_DATASETS and not _MANUAL_DIR.value:
            raise cli.UserError(f"--builder_config={name}: needs --manual_dir (the MRAMG-Bench download)")
    for name in _BUILDER_CONFIGS.value:
        builder = prepare(name, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value)
        print(name, {split: info.num_examples for split, info in builder.info.splits.items()})


if __name__ == "__main__":
    cli.run(main)
