"""Sentence splitting and image-marker placement: the one rule every module uses to number sentences.

An image "follows" a sentence: in MRAMG documents and answers a marker (`<PIC>`, `<imgN>`) is written right
after the sentence it illustrates. `locate_markers` strips the markers from a text and says, for each one,
which sentence (0-based, in the marker-free text) it follows, or -1 when it comes before any sentence.
Chunking, gold anchors, candidate prompts and the inserter's `anchors` output format all use these numbers.
"""

from __future__ import annotations

import dataclasses
import re

PIC = "<PIC>"
PIC_RE = re.compile(r"<PIC>")
IMG_RE = re.compile(r"<img(\d+)>")

# A sentence ends at ., ! or ? (optionally followed by closing quotes or brackets) before whitespace or the
# end of the text, or at a line break. Abbreviations split too: a cheap, deterministic rule is what matters.
_SENTENCE_END_RE = re.compile(r"""[.!?]+["')\]]*(?=\s|$)|\n+""")


@dataclasses.dataclass(frozen=True)
class Span:
    """A sentence: its text (stripped) and its [start, end) character span in the text it came from."""

    text: str
    start: int
    end: int


def split_sentences(text: str) -> list[Span]:
    """Splits marker-free text into sentences; whitespace-only pieces are dropped."""
    spans: list[Span] = []
    start = 0
    for m in _SENTENCE_END_RE.finditer(text):
        end = m.end() if m.group(0)[0] != "\n" else m.start()
        _append(spans, text, start, end)
        start = m.end()
    _append(spans, text, start, len(text))
    return spans


def _append(spans: list[Span], text: str, start: int, end: int) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        spans.append(Span(stripped, start + lead, start + lead + len(stripped)))


@dataclasses.dataclass(frozen=True)
class MarkedText:
    """A text with its image markers removed.

    Attributes:
      text: the text without markers (a marker's surrounding spaces collapse to one).
      sentences: `split_sentences(text)`.
      markers: each marker as written (e.g. "<PIC>", "<img3>"), in order of appearance.
      follows: for each marker, the index of the sentence it follows: the last sentence that starts before
        the marker's position; -1 when the marker precedes every sentence.
    """

    text: str
    sentences: tuple[Span, ...]
    markers: tuple[str, ...]
    follows: tuple[int, ...]


def locate_markers(text: str, marker_re: re.Pattern[str]) -> MarkedText:
    """Removes every `marker_re` match from `text` and places each one after a sentence."""
    pieces: list[str] = []
    offsets: list[int] = []
    markers: list[str] = []
    pos = 0
    length = 0
    for m in marker_re.finditer(text):
        piece = text[pos : m.start()]
        if pieces and pieces[-1].endswith(" ") and piece.startswith(" "):
            piece = piece[1:]
        pieces.append(piece)
        length += len(piece)
        offsets.append(length)
        markers.append(m.group(0))
        pos = m.end()
    tail = text[pos:]
    if pieces and pieces[-1].endswith(" ") and tail.startswith(" "):
        tail = tail[1:]
    pieces.append(tail)
    plain = "".join(pieces)
    sentences = split_sentences(plain)
    follows = []
    for offset in offsets:
        index = -1
        for i, span in enumerate(sentences):
            if span.start < offset:
                index = i
            else:
                break
        follows.append(index)
    return MarkedText(plain, tuple(sentences), tuple(markers), tuple(follows))
