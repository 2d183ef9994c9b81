"""An answer with images as a person reads it: Markdown with image links, or one self-contained HTML page.

An answer is text with `<imgN>` placeholders and the map from each id to an image of the dataset
(`systems.SystemAnswer.text` / `image_map`). The placeholder becomes the image itself, on its own line, right
where the inserter put it, with its caption:

  markdown  `![caption](path)` links; each path is relative to the Markdown file's folder (`relative_to`), so
            the file and the corpus can move together.
  html      one page whose images are embedded as `data:` URIs (base64 of the file's bytes, MIME type from its
            content), which opens in a browser with nothing else beside it.

A placeholder whose id is not in the map, or whose image has no file, shows nothing: the reader never sees a
raw `<imgN>` or a broken image.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import urllib.parse
from collections.abc import Mapping, Sequence

from m2io_jax.data import mramg
from m2io_jax.data.sentences import IMG_RE

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5; }
article { border-bottom: 1px solid #ddd; padding-bottom: 1.5rem; margin-bottom: 1.5rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { color: #555; font-size: 0.9rem; }
"""


@dataclasses.dataclass(frozen=True)
class RenderedAnswer:
    """One question and its answer as the pages show them.

    Attributes:
      question: the question text.
      text: the answer with `<imgN>` placeholders.
      image_map: {"img1": image name, ...}: what each placeholder shows.
    """

    question: str
    text: str
    image_map: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of an answer: text, or the image `image` (its metadata) where a placeholder stood."""

    text: str = ""
    image: mramg.ImageInfo | None = None


def segments(answer: RenderedAnswer, images: Mapping[str, mramg.ImageInfo]) -> list[Segment]:
    """The answer's text pieces and images in reading order; placeholders that show no file are dropped and the
    text around them joined."""
    out: list[Segment] = []
    text, previous = "", 0
    for match in IMG_RE.finditer(answer.text):
        text += answer.text[previous:match.start()]
        previous = match.end()
        info = images.get(answer.image_map.get(match.group(0)[1:-1], ""))
        if info is None or not info.path or not os.path.isfile(info.path):
            continue
        if text.strip():
            out.append(Segment(text=" ".join(text.split())))
        text = ""
        out.append(Segment(image=info))
    text += answer.text[previous:]
    if text.strip():
        out.append(Segment(text=" ".join(text.split())))
    return out


def shown_images(answer: RenderedAnswer, images: Mapping[str, mramg.ImageInfo]) -> list[str]:
    """Names of the images the pages show for `answer`, in order."""
    return [s.image.name for s in segments(answer, images) if s.image is not None]


def markdown(answers: Sequence[RenderedAnswer], images: Mapping[str, mramg.ImageInfo], *, relative_to: str) -> str:
    """The answers as Markdown: a `##` heading per question, its text and `![caption](path)` image lines, paths
    relative to the folder `relative_to` (where the Markdown file goes)."""
    parts = []
    for answer in answers:
        parts.append(f"## {' '.join(answer.question.split())}")
        for segment in segments(answer, images):
            if segment.image is None:
                parts.append(segment.text)
                continue
            path = os.path.relpath(os.path.abspath(segment.image.path), os.path.abspath(relative_to))
            caption = _markdown_caption(segment.image.caption or segment.image.name)
            parts.append(f"![{caption}]({urllib.parse.quote(path.replace(os.sep, '/'))})")
    return "\n\n".join(parts) + "\n"


def _markdown_caption(caption: str) -> str:
    return " ".join(caption.split()).replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def data_uri(path: str) -> str:
    """The file at `path` as a `data:` URI, its MIME type read from the image itself (PIL).

    Raises:
      ValueError: the file is not an image PIL can read.
    """
    from PIL import Image

    with open(path, "rb") as f:
        raw = f.read()
    try:
        with Image.open(path) as image:
            kind = Image.MIME.get(image.format or "")
    except OSError as error:
        raise ValueError(f"{path}: not a readable image ({error}); expected a PNG, JPEG, GIF or WebP file") from error
    if kind is None:
        raise ValueError(f"{path}: image format without a MIME type; expected a PNG, JPEG, GIF or WebP file")
    return f"data:{kind};base64,{base64.b64encode(raw).decode('ascii')}"


def html_page(answers: Sequence[RenderedAnswer], images: Mapping[str, mramg.ImageInfo], *,
              title: str = "Answers") -> str:
    """The answers as one self-contained HTML page: every image embedded as a `data:` URI."""
    body = []
    for answer in answers:
        body.append(f"<article>\n<h2>{html.escape(' '.join(answer.question.split()))}</h2>")
        for segment in segments(answer, images):
            if segment.image is None:
                body.append(f"<p>{html.escape(segment.text)}</p>")
                continue
            caption = html.escape(" ".join((segment.image.caption or segment.image.name).split()), quote=True)
            body.append(f'<figure><img src="{data_uri(segment.image.path)}" alt="{caption}" '
                        f'data-image="{html.escape(segment.image.name, quote=True)}">'
                        f"<figcaption>{caption}</figcaption></figure>")
        body.append("</article>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
