"""Text retriever over an MRAMG corpus: chunk documents, embed the chunks, index them, search top-k per question.

Retrieval is text-only (the MRAMG-Bench recipe): chunks are embedded without their `<PIC>` markers, and the
images of the retrieved chunks are the candidate images. The encoder is any object with
`encode(texts, batch_size=...) -> [N, D] float32 L2-normalised` (in practice the `SentenceEncoder` of
`m2io_jax.models.sentence_encoder.load_encoder`); the index is `m2io_jax.retrieval.index.ScannIndex` unless
another class with the same `build(embeddings, config)` / `search(queries, k)` interface is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Protocol, Sequence

import ml_collections
import numpy as np

from m2io_jax.data import mramg
from m2io_jax.retrieval import chunking


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...


def token_length_fn(encoder: Any) -> chunking.LengthFn:
    """The encoder's own token count (no special tokens) as a chunking length function.

    Uses `encoder.count_tokens` if it exists, else `encoder.tokenizer` (a `tokenizers.Tokenizer` or a
    transformers tokenizer), else the wordpiece estimate of `chunking.estimate_tokens`.
    """
    count = getattr(encoder, "count_tokens", None)
    if callable(count):
        return lambda text: int(count([text])[0])
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        counter = type(tokenizer).from_str(tokenizer.to_str())  # a copy: count past the encoder's truncation
        counter.no_truncation()
        counter.no_padding()
        return lambda text: len(counter.encode(text, add_special_tokens=False).ids)
    if tokenizer is not None and callable(tokenizer):  # transformers tokenizer
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return chunking.estimate_tokens


@dataclasses.dataclass(frozen=True)
class Hit:
    chunk: chunking.Chunk
    score: float


CHUNKS_FILE = "chunks.jsonl"
INDEX_DIR = "index"


class Retriever:
    """Chunks of one corpus, their index, and the encoder that embeds queries the same way.

    `save(directory)` writes the chunks (`chunks.jsonl`, one JSON object per chunk, in index order) and the index
    (`index/`, `ScannIndex.save`); `Retriever.load(directory, encoder)` reads them back and searches identically,
    given the encoder the index was built with.
    """

    def __init__(self, chunks: Sequence[chunking.Chunk], index: Any, encoder: Encoder, *, batch_size: int = 64):
        self.chunks = list(chunks)
        self.index = index
        self.encoder = encoder
        self.batch_size = batch_size
        self._by_doc: dict[str, list[chunking.Chunk]] = {}
        for chunk in self.chunks:
            self._by_doc.setdefault(chunk.doc_id, []).append(chunk)

    @classmethod
    def build(
        cls,
        documents: Iterable[mramg.Document] | Mapping[str, mramg.Document],
        encoder: Encoder,
        *,
        max_tokens: int,
        batch_size: int,
        length_fn: chunking.LengthFn | None = None,
        index_overrides: Mapping[str, Any] | None = None,
        index_cls: Any = None,
    ) -> "Retriever":
        """Chunks `documents` (with the encoder's tokenizer unless `length_fn` is given), embeds and indexes them.

        `index_overrides` replace fields of `m2io_jax.retrieval.index.index_config()` (e.g. `{"reorder": 200}`);
        `index_cls` swaps the index for another class with the same `build`/`search` interface.
        """
        if isinstance(documents, Mapping):
            documents = documents.values()
        chunks = chunking.chunk_documents(documents, max_tokens=max_tokens,
                                          length_fn=length_fn or token_length_fn(encoder))
        if not chunks:
            raise ValueError("no chunks to index: the corpus has no document text")
        texts = [c.plain_text for c in chunks]
        embeddings = np.asarray(encoder.encode(texts, batch_size=batch_size), np.float32)  # [C, D]
        if embeddings.shape[0] != len(chunks):
            raise ValueError(f"encoder returned {embeddings.shape[0]} embeddings for {len(chunks)} chunks")
        config = None
        if index_cls is None:
            from m2io_jax.retrieval import index as index_lib

            index_cls = index_lib.ScannIndex
            config = index_lib.index_config()
            config.update(dict(index_overrides or {}))
        elif index_overrides:
            raise ValueError(f"index_overrides {dict(index_overrides)} apply to the default ScannIndex only")
        return cls(chunks, index_cls.build(embeddings, config), encoder, batch_size=batch_size)

    @classmethod
    def from_config(cls, documents: Iterable[mramg.Document] | Mapping[str, mramg.Document], encoder: Encoder,
                    data: ml_collections.ConfigDict) -> "Retriever":
        """`build` with the chunking and retrieval settings of a data config (`m2io_jax.data.config`)."""
        return cls.build(documents, encoder, max_tokens=data.chunk.max_tokens, batch_size=data.retrieval.batch_size,
                         index_overrides=data.retrieval.index.to_dict())

    def save(self, directory: str) -> None:
        """Writes the chunks and the index (an index class with `save(directory)`) under `directory`."""
        if not callable(getattr(self.index, "save", None)):
            raise TypeError(f"{type(self.index).__name__} has no save(directory): only a saveable index (ScannIndex) "
                            f"can be written")
        os.makedirs(directory, exist_ok=True)
        self.index.save(os.path.join(directory, INDEX_DIR))
        path = os.path.join(directory, CHUNKS_FILE)
        with open(f"{path}.partial", "w", encoding="utf-8") as f:
            for chunk in self.chunks:
                f.write(json.dumps(dataclasses.asdict(chunk), ensure_ascii=False) + "\n")
        os.replace(f"{path}.partial", path)

    @classmethod
    def load(cls, directory: str, encoder: Encoder, *, batch_size: int = 64) -> "Retriever":
        """A retriever written by `save`; `encoder` must be the one the index was built with."""
        from m2io_jax.retrieval import index as index_lib

        path = os.path.join(directory, CHUNKS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (not a directory written by Retriever.save)")
        chunks = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                    chunks.append(chunking.Chunk(doc_id=record["doc_id"], index=int(record["index"]),
                                                 text=record["text"], images=tuple(record["images"]),
                                                 dataset=record["dataset"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_number}: not a chunk record (doc_id, index, text, images, "
                                     f"dataset): {e}") from e
        index = index_lib.ScannIndex.load(os.path.join(directory, INDEX_DIR))
        if index.num_vectors != len(chunks):
            raise ValueError(f"{directory}: the index holds {index.num_vectors} vectors for {len(chunks)} chunks in "
                             f"{CHUNKS_FILE}; expected one per chunk")
        return cls(chunks, index, encoder, batch_size=batch_size)

    def chunks_of(self, doc_id: str) -> list[chunking.Chunk]:
        """All chunks of one document, in document order."""
        return list(self._by_doc.get(doc_id, ()))

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-`k` chunks for each query, best first."""
        k = min(k, len(self.chunks))
        q = np.asarray(self.encoder.encode(list(queries), batch_size=self.batch_size), np.float32)  # [Q, D]
        ids, scores = self.index.search(q, k)  # [Q, k], [Q, k]
        return [
            [Hit(self.chunks[int(i)], float(s)) for i, s in zip(row_ids, row_scores) if 0 <= int(i) < len(self.chunks)]
            for row_ids, row_scores in zip(np.asarray(ids), np.asarray(scores))
        ]


def gold_chunks(question: mramg.Question, retriever: Retriever) -> list[chunking.Chunk]:
    """Chunks of the question's provenance documents that hold at least one of its gold images."""
    gold = set(question.images)
    return [c for d in question.provenance for c in retriever.chunks_of(d) if gold.intersection(c.images)]
