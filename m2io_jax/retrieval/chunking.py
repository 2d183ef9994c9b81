"""Sentence-aware chunking of MRAMG documents that keeps track of the images in each chunk.

A document's text is split into sentences (`m2io_jax.data.sentences`); each `<PIC>` stays attached to the
sentence it follows. Sentences are packed greedily into chunks of at most `max_tokens` tokens, a chunk's
length being the sum of its sentences' `length_fn` (the retrieval encoder's tokenizer in practice); a single
sentence longer than that is cut on word boundaries (`max_tokens` comes from the data config,
`chunk.max_tokens`). Each chunk keeps its `<PIC>` markers and the image names they stand for, in order, so the
k-th `<PIC>` in `Chunk.text` is `Chunk.images[k]`. Markers beyond a document's `images_list` (a mismatch the
reader reports) are dropped from the chunk text.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib

LengthFn = Callable[[str], int]

_WORDPIECE_RE = re.compile(r"\w+|[^\w\s]")
_PIC_TOKENS = 1


def estimate_tokens(text: str) -> int:
    """A wordpiece-like length estimate: words and punctuation marks, long words counting one per 8 chars."""
    n = 0
    for piece in _WORDPIECE_RE.findall(text.replace(sentences_lib.PIC, " ")):
        n += 1 + (len(piece) - 1) // 8
    return n + _PIC_TOKENS * text.count(sentences_lib.PIC)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A passage of one document. `text` keeps `<PIC>` markers; the k-th one is `images[k]`."""

    doc_id: str
    index: int
    text: str
    images: tuple[str, ...]
    dataset: str

    @property
    def plain_text(self) -> str:
        """The text without image markers (what the encoder embeds)."""
        return sentences_lib.locate_markers(self.text, sentences_lib.PIC_RE).text


def distinct_images(chunks: Iterable[Chunk]) -> list[str]:
    """Distinct image names of `chunks`, in order of first appearance (the candidate images of a retrieval)."""
    seen: dict[str, None] = {}
    for chunk in chunks:
        for name in chunk.images:
            seen.setdefault(name, None)
    return list(seen)


def _sentence_units(content: str, images: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(sentence text with its trailing `<PIC>` markers, image names) for each sentence of `content`."""
    marked = sentences_lib.locate_markers(content, sentences_lib.PIC_RE)
    attached: dict[int, list[str]] = {}
    for k, index in enumerate(marked.follows):
        if k < len(images):
            attached.setdefault(index, []).append(images[k])
    units: list[tuple[str, tuple[str, ...]]] = []
    if -1 in attached:
        units.append((" ".join([sentences_lib.PIC] * len(attached[-1])), tuple(attached[-1])))
    for i, span in enumerate(marked.sentences):
        names = tuple(attached.get(i, ()))
        text = span.text + "".join(sentences_lib.PIC for _ in names)
        units.append((text, names))
    return units


def _split_long(
    text: str, names: tuple[str, ...], max_tokens: int, length_fn: LengthFn
) -> list[tuple[str, tuple[str, ...]]]:
    """Cuts one over-long sentence on word boundaries; its images go with the last piece."""
    words = sentences_lib.PIC_RE.sub("", text).split()
    pieces: list[str] = []
    current: list[str] = []
    for word in words:
        if current and length_fn(" ".join(current + [word])) > max_tokens:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    pieces.append(" ".join(current))
    out = [(p, ()) for p in pieces[:-1]]
    out.append((pieces[-1] + sentences_lib.PIC * len(names), names))
    return out


def chunk_document(doc: mramg.Document, *, max_tokens: int, length_fn: LengthFn = estimate_tokens) -> list[Chunk]:
    """Splits one document into chunks of at most `max_tokens` tokens (a lone long sentence is cut)."""
    if max_tokens < 8:
        raise ValueError(f"max_tokens={max_tokens}: expected at least 8")
    units: list[tuple[str, tuple[str, ...]]] = []
    for text, names in _sentence_units(doc.content, doc.images):
        if length_fn(text) > max_tokens:
            units.extend(_split_long(text, names, max_tokens, length_fn))
        else:
            units.append((text, names))
    chunks: list[Chunk] = []
    texts: list[str] = []
    images: list[str] = []
    used = 0

    def flush():
        if texts:
            chunks.append(Chunk(doc.id, len(chunks), " ".join(texts), tuple(images), doc.dataset))
            texts.clear()
            images.clear()

    for text, names in units:
        n = length_fn(text)  # chunk length = sum of its sentences' lengths
        if texts and used + n > max_tokens:
            flush()
            used = 0
        texts.append(text)
        images.extend(names)
        used += n
    flush()
    return chunks


def chunk_documents(
    documents: Iterable[mramg.Document], *, max_tokens: int, length_fn: LengthFn = estimate_tokens
) -> list[Chunk]:
    """Chunks every document, in iteration order."""
    return [c for doc in documents for c in chunk_document(doc, max_tokens=max_tokens, length_fn=length_fn)]
