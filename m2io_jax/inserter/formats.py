"""The inserter's output formats: one renderer and one parser per format, one assembler into inline text.

A completion is `<answer>...</answer>`, preceded by `<think>...</think>` when thinking is on. The answer body
holds, by format:

  inline   the answer text unchanged, with `<imgN>` written right after the sentence each image illustrates
           (before the first sentence: at the start). No image: the text alone.
  anchors  placements only, whitespace-separated `<imgN>@k` items: image `imgN` goes after numbered sentence
           k (numbers are 1-based, as the prompt shows them; `@0` is before the first sentence), e.g.
           `<answer><img3>@2 <img1>@5</answer>`. No image: `<answer></answer>`.

A `Placement` holds a candidate id (`img3`) and a 0-based sentence index of the marker-free answer, as
`m2io_jax.data.sentences` numbers them (-1: before the first sentence), the same numbering as gold anchors.
Both formats are assembled into inline text (`assemble_inline`) and scored by the same rewards.

Parsing never raises on model output. Problems come in two kinds: structure (the completion does not follow
the format's grammar: tags missing, repeated or out of order, text outside the tags, a malformed anchors
item), which sets `parse_failed`; and validity (an id that is not a candidate, an id used twice, a sentence
number out of range), which only fails the format reward. Placements are recovered wherever possible, so
ungated content rewards still see them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from m2io_jax.data import sentences as sentences_lib
from m2io_jax.eval import metrics

INLINE = "inline"
ANCHORS = "anchors"
FORMATS = (INLINE, ANCHORS)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_ANCHOR_ITEM_RE = re.compile(r"<img(\d+)>@(\d+)")

# Problem kinds. Structure problems mean the completion did not parse; validity problems only fail the format.
MISSING_ANSWER = "missing_answer"
BAD_TAGS = "bad_tags"
TEXT_OUTSIDE_TAGS = "text_outside_tags"
MALFORMED_ITEM = "malformed_item"
UNKNOWN_ID = "unknown_id"
DUPLICATE_ID = "duplicate_id"
SENTENCE_OUT_OF_RANGE = "sentence_out_of_range"
STRUCTURE_PROBLEMS = frozenset({MISSING_ANSWER, BAD_TAGS, TEXT_OUTSIDE_TAGS, MALFORMED_ITEM})


def check_format(output_format: str) -> str:
    """`output_format` itself when it is a known format; otherwise a ValueError listing the known ones."""
    if output_format not in FORMATS:
        raise ValueError(f"inserter output format {output_format!r}: expected one of {FORMATS}")
    return output_format


def anchor_number(sentence_index: int) -> int:
    """The number a sentence carries in the prompt and in `anchors` items (1-based; -1 -> 0, before the first)."""
    return sentence_index + 1


@dataclasses.dataclass(frozen=True)
class Placement:
    """Candidate `image` (an id such as "img3") goes after sentence `sentence` (0-based; -1: before the first)."""

    image: str
    sentence: int


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a completion: `kind` (one of the constants above) and what was found."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says.

    Attributes:
      placements: the images placed, in the order written (ids as written, sentence indices 0-based).
      inline_text: the answer with `<imgN>` placed: the answer body for `inline`, the assembled answer for
        `anchors` (placements that could not be assembled are left out); "" when no answer was found.
      reasoning: the `<think>` text, or None when there is none.
      problems: everything wrong, in the order found.
    """

    placements: tuple[Placement, ...]
    inline_text: str
    reasoning: str | None
    problems: tuple[Problem, ...]

    @property
    def parse_failed(self) -> bool:
        """The completion does not follow the format's grammar."""
        return any(p.kind in STRUCTURE_PROBLEMS for p in self.problems)

    @property
    def well_formed(self) -> bool:
        """No problem at all: the format reward passes."""
        return not self.problems

    @property
    def images(self) -> list[str]:
        """Placed image ids in the order of the inline text (the prediction the metrics score)."""
        return metrics.image_markers(self.inline_text)


def assemble_inline(answer: str, placements: Sequence[Placement]) -> str:
    """`answer` with `<imgN>` written right after each placement's sentence (index -1: at the very start).

    Images that follow the same sentence keep the order of `placements`. The answer text itself is untouched.

    Raises:
      ValueError: a placement's sentence index is outside [-1, number of sentences).
    """
    spans = sentences_lib.split_sentences(answer)
    after: dict[int, list[str]] = {}
    for placement in placements:
        if not -1 <= placement.sentence < len(spans):
            raise ValueError(
                f"placement {placement}: sentence index out of range [-1, {len(spans)}) for an answer of "
                f"{len(spans)} sentences"
            )
        after.setdefault(placement.sentence, []).append(f"<{placement.image}>")
    cuts = [(0, after.get(-1, []))] + [(spans[i].end, markers) for i, markers in sorted(after.items()) if i >= 0]
    pieces, previous = [], 0
    for position, markers in cuts:
        pieces += [answer[previous:position], "".join(markers)]
        previous = position
    pieces.append(answer[previous:])
    return "".join(pieces)


def render_completion(
    answer: str,
    placements: Sequence[Placement],
    *,
    output_format: str,
    think: bool = False,
    reasoning: str = "",
) -> str:
    """The completion that states `placements` in `output_format` (e.g. gold placements -> an SFT target).

    `anchors` items are written in the order of the assembled inline text. `reasoning` fills the
    `<think>` block when `think` is on.
    """
    inline = assemble_inline(answer, placements)
    if check_format(output_format) == INLINE:
        body = inline
    else:
        ranked = sorted(placements, key=lambda p: p.sentence)  # stable: ties keep the order of `placements`
        body = " ".join(f"<{p.image}>@{anchor_number(p.sentence)}" for p in ranked)
    prefix = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}\n" if think else ""
    return f"{prefix}{ANSWER_OPEN}{body}{ANSWER_CLOSE}"


def parse_completion(
    completion: str,
    *,
    output_format: str,
    think: bool,
    answer: str,
    candidate_ids: Sequence[str],
) -> ParsedCompletion:
    """Reads a completion in `output_format`; never raises on what the model wrote.

    Args:
      completion: the decoded completion text.
      output_format: "inline" or "anchors".
      think: whether a `<think>` block must come before the answer.
      answer: the marker-free answer text the prompt showed (its sentences are the ones numbered).
      candidate_ids: the candidate ids ("img1", ...) the prompt offered.
    """
    check_format(output_format)
    reasoning, body, problems = _split_tags(completion, think)
    if body is None:
        return ParsedCompletion((), "", reasoning, tuple(problems))
    if output_format == INLINE:
        marked = sentences_lib.locate_markers(body, sentences_lib.IMG_RE)
        placements = [Placement(marker[1:-1], index) for marker, index in zip(marked.markers, marked.follows)]
        inline_text = body
    else:
        placements = _parse_anchor_items(body, len(sentences_lib.split_sentences(answer)), problems)
        inline_text = assemble_inline(answer, placements)
    problems += _id_problems(placements, candidate_ids)
    return ParsedCompletion(tuple(placements), inline_text, reasoning, tuple(problems))


def _split_tags(completion: str, think: bool) -> tuple[str | None, str | None, list[Problem]]:
    """(reasoning, answer body, structure problems) of a completion; the body is None without an answer."""
    problems: list[Problem] = []
    counts = {tag: completion.count(tag) for tag in _TAGS}
    expected = 1 if think else 0
    for tag in _TAGS:
        want = 1 if tag in (ANSWER_OPEN, ANSWER_CLOSE) else expected
        if counts[tag] != want:
            problems.append(Problem(BAD_TAGS, f"{tag} appears {counts[tag]} times, expected {want}"))
    answer_match = re.search(re.escape(ANSWER_OPEN) + "(.*?)" + re.escape(ANSWER_CLOSE), completion, re.DOTALL)
    think_match = re.search(re.escape(THINK_OPEN) + "(.*?)" + re.escape(THINK_CLOSE), completion, re.DOTALL)
    reasoning = think_match.group(1) if think_match else None
    if answer_match is None:
        problems.insert(0, Problem(MISSING_ANSWER, f"no {ANSWER_OPEN}...{ANSWER_CLOSE} in {_preview(completion)}"))
        return reasoning, None, problems
    if think and think_match and think_match.start() > answer_match.start():
        problems.append(Problem(BAD_TAGS, f"the {THINK_OPEN} block comes after {ANSWER_OPEN}; expected it before"))
    outside = list(completion)
    for match in (think_match, answer_match):
        if match is not None:
            outside[match.start() : match.end()] = " " * (match.end() - match.start())
    rest = "".join(outside).strip()
    if rest and not any(tag in rest for tag in _TAGS):
        problems.append(Problem(TEXT_OUTSIDE_TAGS, f"text outside the tags: {_preview(rest)}"))
    return reasoning, answer_match.group(1), problems


def _parse_anchor_items(body: str, num_sentences: int, problems: list[Problem]) -> list[Placement]:
    """Placements of an `anchors` body; malformed items and out-of-range numbers become problems and are skipped."""
    placements = []
    for item in body.split():
        match = _ANCHOR_ITEM_RE.fullmatch(item)
        if match is None:
            problems.append(Problem(MALFORMED_ITEM, f"{_preview(item)} is not <imgN>@k"))
            continue
        number = int(match.group(2))
        if number > num_sentences:
            problems.append(Problem(
                SENTENCE_OUT_OF_RANGE,
                f"{item}: the answer's sentences are numbered 1..{num_sentences} (0: before the first)"))
            continue
        placements.append(Placement(f"img{match.group(1)}", number - 1))
    return placements


def _id_problems(placements: Sequence[Placement], candidate_ids: Sequence[str]) -> list[Problem]:
    """Ids that are not candidates, and ids placed more than once (each reported once)."""
    known = set(candidate_ids)
    images = [placement.image for placement in placements]
    problems = [Problem(UNKNOWN_ID, f"<{image}> is not one of the {len(known)} candidates")
                for image in dict.fromkeys(images) if image not in known]
    problems += [Problem(DUPLICATE_ID, f"<{image}> is placed {images.count(image)} times")
                 for image in dict.fromkeys(images) if images.count(image) > 1]
    return problems


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
