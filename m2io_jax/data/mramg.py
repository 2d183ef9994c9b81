"""MRAMG-Bench reader: documents, questions and images of one dataset from a local download.

Accepted layout under `root` (the official one; every alternative listed is searched, first match wins):

  doc_{name}.jsonl          one document per line: a JSON array `[id, content, images_list]` (the official
                            form) or an object `{"id", "content", "images_list"}`; the k-th `<PIC>` in
                            `content` is `images_list[k]`.
  {name}_mqa.jsonl          one question per line: `{"id", "question", "provenance", "ground_truth",
                            "images_list"}`.
  (both also accepted under `{name}/`)
  images_info/{name}_imgs_collection.json
                            `{image_name: {"image_caption": str, "image_path": str, ...}}`; also searched
                            under `IMAGE/images_info/`, `IMAGE/IMAGE/images_info/` and `root` itself.
  image files               `{base}/{image_path}` for base in `images/{NAME}`, `IMAGE/images/{NAME}`,
                            `IMAGE/IMAGE/images/{NAME}` (NAME upper-case, then as given), then `images`,
                            `IMAGE/images`, `IMAGE/IMAGE/images`, `root`; `IMAGE.zip` unpacks to
                            `IMAGE/IMAGE/images/...` and other tools expect `IMAGE/images/...`.

Ids are normalised to `str` (documents carry ints on disk). Bad input never disappears silently: every
malformed line, missing field, missing or unreadable image file, `<PIC>`/`images_list` count mismatch,
duplicate id or dangling reference becomes a `Problem` naming `file:line`, collected in `report.problems`
(`strict=True` raises `MramgFormatError` on the first one instead).

The gold answer's image markers are not documented upstream, so the reader detects them per question
(`<PIC>`, `<imgN>`, image names, or none), reports the forms found, and derives gold anchors (the sentence
each gold image follows) where the form allows it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterator

from m2io_jax.data import sentences as sentences_lib

DATASETS = ("wit", "wiki", "web", "arxiv", "recipe", "manual")

# How a gold answer marks its images.
FORM_PIC = "pic"  # `<PIC>` after a sentence; the k-th marker is images_list[k]
FORM_IMG = "img"  # `<imgN>`; the k-th marker is images_list[k]
FORM_NAME = "name"  # the image names themselves appear in the text
FORM_NONE = "none"  # no marker: images_list only (no placement information)
FORM_NO_IMAGES = "no_images"  # the question has no gold image

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


class MramgFormatError(ValueError):
    """Raised in strict mode for the first problem found; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong in the input. `line` is 1-based, 0 when the problem concerns a whole file."""

    kind: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.kind}] {self.message}"


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    content: str
    images: tuple[str, ...]
    dataset: str


@dataclasses.dataclass(frozen=True)
class GoldAnchor:
    """A gold image and the sentence of the (marker-free) gold answer it follows (-1: before the first)."""

    image: str
    sentence_index: int
    sentence: str


@dataclasses.dataclass(frozen=True)
class Question:
    """A question. `answer` is `ground_truth` with image markers removed (for `name` form: unchanged)."""

    id: str
    question: str
    provenance: tuple[str, ...]
    ground_truth: str
    images: tuple[str, ...]
    dataset: str
    marker_form: str = FORM_NONE
    answer: str = ""
    anchors: tuple[GoldAnchor, ...] = ()


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    name: str
    caption: str
    path: str  # absolute path of the image file ("" when it could not be found)


@dataclasses.dataclass
class LoadReport:
    """What was read, from where, and everything that was wrong."""

    dataset: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    num_documents: int = 0
    num_questions: int = 0
    num_images: int = 0
    skipped_lines: int = 0
    marker_forms: dict[str, int] = dataclasses.field(default_factory=dict)
    answer_marker_form: str = FORM_NONE
    problems: list[Problem] = dataclasses.field(default_factory=list)

    def problem_counts(self) -> dict[str, int]:
        return dict(collections.Counter(p.kind for p in self.problems))

    def summary(self) -> str:
        lines = [
            f"{self.dataset}: {self.num_documents} documents, {self.num_questions} questions, "
            f"{self.num_images} images; answer marker form {self.answer_marker_form!r} {self.marker_forms}; "
            f"{self.skipped_lines} malformed lines skipped; {len(self.problems)} problems {self.problem_counts()}"
        ]
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


@dataclasses.dataclass
class MramgDataset:
    name: str
    root: str
    documents: dict[str, Document]
    questions: list[Question]
    images: dict[str, ImageInfo]
    report: LoadReport


class _Problems:
    """Collects problems; in strict mode the first one raises."""

    def __init__(self, report: LoadReport, strict: bool):
        self.report = report
        self.strict = strict

    def add(self, kind: str, file: str, line: int, message: str) -> None:
        problem = Problem(kind, file, line, message)
        if self.strict:
            raise MramgFormatError(str(problem))
        self.report.problems.append(problem)


def find_file(root: str, candidates: list[str]) -> str | None:
    """The first of `candidates` (relative to `root`) that is a file, else None."""
    for rel in candidates:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
    return None


def documents_file(root: str, name: str) -> str | None:
    return find_file(root, [f"doc_{name}.jsonl", os.path.join(name, f"doc_{name}.jsonl")])


def dataset_names(root: str) -> list[str]:
    """Names of the datasets whose documents file (`doc_{name}.jsonl`, at `root` or under `{name}/`) is in `root`."""
    if not os.path.isdir(root):
        return []
    names = set()
    for entry in os.listdir(root):
        match = re.fullmatch(r"doc_(\w+)\.jsonl", entry)
        if match:
            names.add(match.group(1))
        elif os.path.isfile(os.path.join(root, entry, f"doc_{entry}.jsonl")):
            names.add(entry)
    return sorted(names)


def questions_file(root: str, name: str) -> str | None:
    return find_file(root, [f"{name}_mqa.jsonl", os.path.join(name, f"{name}_mqa.jsonl")])


def images_info_file(root: str, name: str) -> str | None:
    base = f"{name}_imgs_collection.json"
    return find_file(
        root,
        [
            os.path.join("images_info", base),
            os.path.join("IMAGE", "images_info", base),
            os.path.join("IMAGE", "IMAGE", "images_info", base),
            base,
            os.path.join(name, "images_info", base),
        ],
    )


def image_base_dirs(root: str, name: str) -> list[str]:
    """Existing directories an `image_path` may be relative to, most specific first."""
    candidates = []
    for prefix in ("", "IMAGE", os.path.join("IMAGE", "IMAGE")):
        for sub in (name.upper(), name):
            candidates.append(os.path.join(root, prefix, "images", sub))
    for prefix in ("", "IMAGE", os.path.join("IMAGE", "IMAGE")):
        candidates.append(os.path.join(root, prefix, "images"))
    candidates.append(root)
    seen, out = set(), []
    for c in candidates:
        c = os.path.abspath(c)
        if c not in seen and os.path.isdir(c):
            seen.add(c)
            out.append(c)
    return out


def _jsonl(path: str, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """Yields (line_number, parsed_value) for each non-blank line; malformed lines become problems."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                problems.report.skipped_lines += 1
                problems.add(
                    "malformed_json", path, lineno, f"invalid JSON ({e.msg} at column {e.colno}); line skipped"
                )


def _read_documents(path: str, name: str, problems: _Problems) -> tuple[dict[str, Document], dict[str, int]]:
    documents: dict[str, Document] = {}
    lines: dict[str, int] = {}
    for lineno, value in _jsonl(path, problems):
        if isinstance(value, list) and len(value) == 3:
            doc_id, content, images = value
        elif isinstance(value, dict) and {"id", "content", "images_list"} <= value.keys():
            doc_id, content, images = value["id"], value["content"], value["images_list"]
        else:
            problems.report.skipped_lines += 1
            problems.add(
                "bad_document",
                path,
                lineno,
                f"expected [id, content, images_list] or an object with those keys, found {_preview(value)}; "
                "line skipped",
            )
            continue
        if not isinstance(content, str) or not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            problems.report.skipped_lines += 1
            problems.add(
                "bad_document", path, lineno, "content must be a string and images_list a list of strings; line skipped"
            )
            continue
        doc_id = str(doc_id)
        if doc_id in documents:
            problems.add(
                "duplicate_id", path, lineno, f"document id {doc_id!r} repeats an earlier line; this line is ignored"
            )
            continue
        num_pics = len(sentences_lib.PIC_RE.findall(content))
        if num_pics != len(images):
            problems.add(
                "pic_count_mismatch", path, lineno,
                f"document {doc_id}: {num_pics} <PIC> markers but {len(images)} entries in images_list",
            )
        documents[doc_id] = Document(doc_id, content, tuple(images), name)
        lines[doc_id] = lineno
    return documents, lines


def _read_images(path: str, root: str, name: str, problems: _Problems, check_images: bool) -> dict[str, ImageInfo]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        problems.add("malformed_json", path, e.lineno, f"invalid JSON ({e.msg}); no image metadata read")
        return {}
    if not isinstance(raw, dict):
        problems.add(
            "bad_images_info", path, 0, f"expected an object {{image_name: {{...}}}}, found {type(raw).__name__}"
        )
        return {}
    bases = image_base_dirs(root, name)
    key_line = _key_lines(text)
    images: dict[str, ImageInfo] = {}
    for image_name, entry in raw.items():
        line = key_line.get(image_name, 0)
        if not isinstance(entry, dict):
            problems.add(
                "bad_images_info", path, line, f"image {image_name!r}: expected an object, found {_preview(entry)}"
            )
            continue
        caption = entry.get("image_caption")
        if not isinstance(caption, str):
            problems.add("bad_images_info", path, line, f"image {image_name!r}: missing or non-string 'image_caption'")
            caption = ""
        rel = entry.get("image_path")
        if not isinstance(rel, str) or not rel:
            problems.add("bad_images_info", path, line, f"image {image_name!r}: missing 'image_path'")
            images[image_name] = ImageInfo(image_name, caption, "")
            continue
        resolved = _resolve_image(rel, bases)
        if resolved is None:
            problems.add(
                "missing_image", path, line,
                f"image {image_name!r}: file {rel!r} not found under any of {bases or [root]}",
            )
            resolved = ""
        elif check_images:
            error = _unreadable(resolved)
            if error:
                problems.add("unreadable_image", resolved, 0, f"image {image_name!r}: {error}")
        images[image_name] = ImageInfo(image_name, caption, resolved)
    return images


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each `"name":` key in an images_info file (its first occurrence)."""
    lines: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', line):
            lines.setdefault(m.group(1), lineno)
    return lines


def _resolve_image(rel: str, bases: list[str]) -> str | None:
    if os.path.isabs(rel):
        return rel if os.path.isfile(rel) else None
    for base in bases:
        path = os.path.join(base, rel)
        if os.path.isfile(path):
            return path
    return None


def _unreadable(path: str) -> str:
    """Empty when PIL can parse the file's header; otherwise why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.size
    except (OSError, UnidentifiedImageError) as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    return ""


def _read_questions(path: str, name: str, problems: _Problems) -> tuple[list[Question], list[int]]:
    questions: list[Question] = []
    lines: list[int] = []
    seen: set[str] = set()
    required = ("id", "question", "provenance", "ground_truth", "images_list")
    for lineno, value in _jsonl(path, problems):
        if not isinstance(value, dict) or any(k not in value for k in required):
            missing = [k for k in required if not isinstance(value, dict) or k not in value]
            problems.report.skipped_lines += 1
            problems.add(
                "bad_question", path, lineno, f"missing keys {missing} (found {_preview(value)}); line skipped"
            )
            continue
        provenance = value["provenance"]
        if not isinstance(provenance, list):
            provenance = [provenance]
        images = value["images_list"]
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            problems.report.skipped_lines += 1
            problems.add("bad_question", path, lineno, "images_list must be a list of image names; line skipped")
            continue
        if not isinstance(value["question"], str) or not isinstance(value["ground_truth"], str):
            problems.report.skipped_lines += 1
            problems.add("bad_question", path, lineno, "question and ground_truth must be strings; line skipped")
            continue
        qid = str(value["id"])
        if qid in seen:
            problems.add(
                "duplicate_id", path, lineno, f"question id {qid!r} repeats an earlier line; this line is ignored"
            )
            continue
        seen.add(qid)
        q = Question(
            qid, value["question"], tuple(str(p) for p in provenance), value["ground_truth"], tuple(images), name
        )
        questions.append(_with_anchors(q, path, lineno, problems))
        lines.append(lineno)
    return questions, lines


def detect_marker_form(ground_truth: str, images: tuple[str, ...]) -> str:
    """Which marker form a gold answer uses (see the FORM_* constants)."""
    if not images:
        return FORM_NO_IMAGES
    if sentences_lib.PIC_RE.search(ground_truth):
        return FORM_PIC
    if sentences_lib.IMG_RE.search(ground_truth):
        return FORM_IMG
    if any(_name_re(image).search(ground_truth) for image in images):
        return FORM_NAME
    return FORM_NONE


def _name_re(image: str) -> re.Pattern[str]:
    stem = re.escape(os.path.splitext(image)[0] if image.lower().endswith(_IMAGE_SUFFIXES) else image)
    return re.compile(rf"(?<![A-Za-z0-9_]){stem}(?:\.[A-Za-z]{{3,4}})?(?![A-Za-z0-9_])")


def _with_anchors(q: Question, path: str, lineno: int, problems: _Problems) -> Question:
    form = detect_marker_form(q.ground_truth, q.images)
    if form in (FORM_PIC, FORM_IMG):
        marked = sentences_lib.locate_markers(
            q.ground_truth, sentences_lib.PIC_RE if form == FORM_PIC else sentences_lib.IMG_RE
        )
        if len(marked.markers) != len(q.images):
            problems.add(
                "answer_marker_mismatch",
                path,
                lineno,
                f"question {q.id}: {len(marked.markers)} image markers in ground_truth but {len(q.images)} "
                "in images_list; "
                "anchors kept for the first min(...) images",
            )
        anchors = tuple(
            GoldAnchor(image, index, marked.sentences[index].text if index >= 0 else "")
            for image, index in zip(q.images, marked.follows)
        )
        return dataclasses.replace(q, marker_form=form, answer=marked.text, anchors=anchors)
    if form == FORM_NAME:
        spans = sentences_lib.split_sentences(q.ground_truth)
        anchors = []
        for image in q.images:
            m = _name_re(image).search(q.ground_truth)
            if m is None:
                continue
            index = max((i for i, s in enumerate(spans) if s.start <= m.start()), default=-1)
            anchors.append(GoldAnchor(image, index, spans[index].text if index >= 0 else ""))
        return dataclasses.replace(q, marker_form=form, answer=q.ground_truth, anchors=tuple(anchors))
    if form == FORM_NO_IMAGES:  # stray markers without gold images: the answer text drops them
        for marker_re in (sentences_lib.PIC_RE, sentences_lib.IMG_RE):
            if marker_re.search(q.ground_truth):
                return dataclasses.replace(
                    q, marker_form=form, answer=sentences_lib.locate_markers(q.ground_truth, marker_re).text
                )
    return dataclasses.replace(q, marker_form=form, answer=q.ground_truth)


def _preview(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_dataset(root: str, name: str, *, strict: bool = False, check_images: bool = True) -> MramgDataset:
    """Reads dataset `name` (e.g. "recipe", or a demo name) from a local MRAMG-layout directory.

    Args:
      root: the download directory (see the module docstring for the layouts searched).
      name: dataset name: the `{name}` in `doc_{name}.jsonl`.
      strict: raise `MramgFormatError` on the first problem instead of collecting it.
      check_images: open each image's header with PIL to catch unreadable files (cheap; no decoding).

    Raises:
      FileNotFoundError: a required file (documents, questions, images_info) is absent; names the paths tried.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r}: expected letters, digits and underscores")
    root = os.path.abspath(root)
    report = LoadReport(dataset=name)
    problems = _Problems(report, strict)
    paths = {
        "documents": documents_file(root, name),
        "questions": questions_file(root, name),
        "images_info": images_info_file(root, name),
    }
    missing = [k for k, v in paths.items() if v is None]
    if missing:
        raise FileNotFoundError(
            f"{root}: dataset {name!r} is missing {missing}; expected doc_{name}.jsonl, {name}_mqa.jsonl and "
            f"images_info/{name}_imgs_collection.json (or IMAGE/IMAGE/images_info/...) in the MRAMG-Bench layout; "
            f"datasets found there: {', '.join(dataset_names(root)) or 'none'}"
        )
    report.files = dict(paths)  # type: ignore[arg-type]
    documents, doc_lines = _read_documents(paths["documents"], name, problems)
    images = _read_images(paths["images_info"], root, name, problems, check_images)
    questions, lines = _read_questions(paths["questions"], name, problems)

    for doc in documents.values():
        for image in doc.images:
            if image not in images:
                problems.add(
                    "unknown_image",
                    paths["documents"],
                    doc_lines[doc.id],
                    f"document {doc.id}: image {image!r} has no images_info entry",
                )
    for q, lineno in zip(questions, lines):
        for doc_id in q.provenance:
            if doc_id not in documents:
                problems.add(
                    "unknown_document",
                    paths["questions"],
                    lineno,
                    f"question {q.id}: provenance document {doc_id!r} not found",
                )
        for image in q.images:
            if image not in images:
                problems.add(
                    "unknown_image",
                    paths["questions"],
                    lineno,
                    f"question {q.id}: gold image {image!r} has no images_info entry",
                )

    forms = collections.Counter(q.marker_form for q in questions)
    report.marker_forms = dict(sorted(forms.items()))
    with_images = collections.Counter({k: v for k, v in forms.items() if k != FORM_NO_IMAGES})
    report.answer_marker_form = with_images.most_common(1)[0][0] if with_images else FORM_NO_IMAGES
    report.num_documents, report.num_questions, report.num_images = len(documents), len(questions), len(images)
    if report.problems:
        logging.warning(
            "%s: %d problems (%d malformed lines skipped): %s; see MramgDataset.report",
            name, len(report.problems), report.skipped_lines, report.problem_counts(),
        )
    return MramgDataset(name, root, documents, questions, images, report)
