"""The retrieval index of a corpus on disk: build it once, load it after, one folder per dataset.

A dataset's corpus (all its documents, whatever split their questions are in) is chunked, embedded and indexed
exactly as the training pipeline does it (`Retriever.from_config`) and written to `{directory}/{dataset}/`:
`chunks.jsonl` and `index/` (`Retriever.save`), and `manifest.json` (the corpus fingerprint: a hash of the
documents and of the settings that shape the index, with counts).

`python -m m2io_jax.answer` and `python -m m2io_jax.evaluate --system` use `{workdir}/index` (`index_dir`): they
load a dataset's index from there when it is present and its fingerprint matches the corpus and settings, and
otherwise build it and cache it there:

    retrievers = index_cache.load_or_build(index_cache.index_dir(workdir), config.data, encoder, datasets)

`python -m m2io_jax.retrieval.build_index` builds the same folders ahead of time. `load` is the strict reader:
a missing or stale index is an error that names that command.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from m2io_jax import cli
from m2io_jax.data import mramg
from m2io_jax.data.demo import demo_root
from m2io_jax.retrieval import retriever as retriever_lib

INDEX_DIR = "index"
MANIFEST = "manifest.json"
_FORMAT_VERSION = 1

def index_dir(workdir: str) -> str:
    """Where a run's cached index lives: `{workdir}/index`."""
    return os.path.join(workdir, INDEX_DIR)


def data_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data settings of `config`: its `data` section when it has one (training configs), else itself."""
    return config.data if "data" in config else config


def corpus_documents(data: ml_collections.ConfigDict, name: str) -> dict[str, mramg.Document]:
    """The documents of dataset `name` from the data config's source: the MRAMG reader on `data_dir` ("" = the
    demo corpus) or, with `source="tfds"`, the `{name}_corpus` build under `tfds_dir`."""
    source = data.get("source", "mramg")
    if source == "tfds":
        return _tfds_documents(data.tfds_dir, name)
    if source != "mramg":
        raise cli.UserError(f"config.data.source={source!r}: expected 'mramg' or 'tfds'")
    root = data.data_dir or demo_root()
    if not os.path.isdir(root):
        raise cli.UserError(f"config.data_dir={root}: no such directory (expected an MRAMG-layout download)")
    if name not in mramg.dataset_names(root):
        raise cli.UserError(f"no dataset {name!r} in {root} (found: {', '.join(mramg.dataset_names(root)) or 'none'})")
    return mramg.load_dataset(root, name, check_images=False).documents


def _tfds_documents(tfds_dir: str, name: str) -> dict[str, mramg.Document]:
    from m2io_jax.data import tfds_builder

    if not tfds_dir:
        raise cli.UserError("config.data.source='tfds' needs config.data.tfds_dir (the TFDS data directory)")
    builder = tfds_builder.Mramg(config=f"{name}_corpus", data_dir=tfds_dir, file_format="array_record")
    if not builder.is_prepared():
        raise FileNotFoundError(f"{builder.data_dir}: no TFDS build of mramg/{name}_corpus; build it with python -m "
                                f"m2io_jax.data.tfds_builder --builder_config={name}_corpus --data_dir={tfds_dir}")
    corpus = builder.as_data_source(split="corpus")
    documents = {}
    for i in range(len(corpus)):
        record = corpus[i]
        doc = mramg.Document(id=_text(record["id"]), content=_text(record["content"]),
                             images=tuple(_text(x) for x in record["images_list"]), dataset=name)
        documents[doc.id] = doc
    return documents


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fingerprint(name: str, documents: Mapping[str, mramg.Document], data: ml_collections.ConfigDict) -> str:
    """sha256 of the dataset's documents (ids, text, image lists, in id order) and the settings that shape its
    index (chunk size, encoder, index overrides): a cached index is reused only when this matches."""
    digest = hashlib.sha256()
    settings = {"format_version": _FORMAT_VERSION, "dataset": name, "chunk_max_tokens": data.chunk.max_tokens,
                "encoder_path": data.retrieval.encoder_path, "index": data.retrieval.index.to_dict()}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for doc_id in sorted(documents):
        doc = documents[doc_id]
        digest.update(json.dumps([doc.id, doc.content, list(doc.images)], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def build(directory: str, name: str, documents: Mapping[str, mramg.Document], data: ml_collections.ConfigDict,
          encoder: retriever_lib.Encoder) -> retriever_lib.Retriever:
    """Chunks, embeds and indexes one dataset's documents and writes them to `directory/{name}`."""
    retriever = retriever_lib.Retriever.from_config(documents, encoder, data)
    target = os.path.join(directory, name)
    retriever.save(target)
    manifest = {"dataset": name, "fingerprint": fingerprint(name, documents, data), "documents": len(documents),
                "chunks": len(retriever.chunks), "index_kind": getattr(retriever.index, "kind", "")}
    with open(os.path.join(target, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return retriever


def _build_command(directory: str) -> str:
    return f"python -m m2io_jax.retrieval.build_index --config=CONFIG --out={directory}"


def load(directory: str, name: str, documents: Mapping[str, mramg.Document], data: ml_collections.ConfigDict,
         encoder: retriever_lib.Encoder) -> retriever_lib.Retriever:
    """The index of dataset `name` saved under `directory` by `build`.

    Raises FileNotFoundError when it is missing and ValueError when its fingerprint does not match `documents`
    and the settings of `data`, each naming the command that (re)builds it.
    """
    path = os.path.join(directory, name, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no index of dataset {name!r}; build it with {_build_command(directory)}")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("fingerprint") != fingerprint(name, documents, data):
        raise ValueError(f"{path}: the index was built from other documents or settings (chunk.max_tokens, "
                         f"retrieval.encoder_path, retrieval.index) than the config's; rebuild it with "
                         f"{_build_command(directory)}")
    return retriever_lib.Retriever.load(os.path.join(directory, name), encoder, batch_size=data.retrieval.batch_size)


def load_or_build(directory: str, data: ml_collections.ConfigDict, encoder: retriever_lib.Encoder,
                  datasets: Sequence[Any], *, log: Callable[[str], None] = print,
                  ) -> dict[str, retriever_lib.Retriever]:
    """One retriever per dataset (objects with `name` and `documents`: `inserter.sources.SplitDataset`,
    `mramg.MramgDataset`): loaded from `directory/{name}` when its fingerprint matches, else built and saved
    there. `log` gets one line per dataset saying which happened."""
    out = {}
    for ds in datasets:
        start = time.perf_counter()
        try:
            out[ds.name] = load(directory, ds.name, ds.documents, data, encoder)
            log(f"index {ds.name}: loaded {len(out[ds.name].chunks)} chunks from {os.path.join(directory, ds.name)}")
        except (FileNotFoundError, ValueError) as reason:
            out[ds.name] = build(directory, ds.name, ds.documents, data, encoder)
            why = "none cached" if isinstance(reason, FileNotFoundError) else "the cached one is stale"
            log(f"index {ds.name}: built {len(out[ds.name].chunks)} chunks in {time.perf_counter() - start:.1f} s "
                f"({why}), saved in {os.path.join(directory, ds.name)}")
    return out
