"""The answer pages: images where the placeholders were, nothing for placeholders that show no file, Markdown
paths relative to the page, HTML images embedded byte for byte, text escaped."""

import base64
import os
import re

import numpy as np
import pytest
from PIL import Image

from m2io_jax import render
from m2io_jax.data import mramg


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "corpus" / "images"
    os.makedirs(folder)
    out = {}
    for name, fmt, size in (("kettle", "PNG", (12, 8)), ("lid", "JPEG", (10, 6))):
        path = str(folder / f"{name}.{fmt.lower()}")
        Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path, format=fmt)
        out[name] = mramg.ImageInfo(name=name, caption=f"the {name} [front]", path=path)
    out["lost"] = mramg.ImageInfo(name="lost", caption="no file", path=str(folder / "lost.png"))
    return out


ANSWER = render.RenderedAnswer(
    question="How do I <clean> the kettle?",
    text="Open the lid.<img2> Wipe it.<img1><img7> Dry it.<img3>",
    image_map={"img1": "kettle", "img2": "lid", "img3": "lost"})


def test_segments_put_each_image_where_its_placeholder_was(images):
    parts = render.segments(ANSWER, images)
    assert [(p.text, p.image.name if p.image else None) for p in parts] == [
        ("Open the lid.", None), ("", "lid"), ("Wipe it.", None), ("", "kettle"), ("Dry it.", None)]
    assert render.shown_images(ANSWER, images) == ["lid", "kettle"]  # img7: no candidate; img3: no file


def test_markdown_links_are_relative_to_the_page(images, tmp_path):
    page_dir = tmp_path / "pages"
    text = render.markdown([ANSWER], images, relative_to=str(page_dir))
    links = re.findall(r"!\[(.*?)\]\((.*?)\)", text)
    assert [os.path.normpath(page_dir / path) for _, path in links] == [images["lid"].path, images["kettle"].path]
    assert links[0][0] == r"the lid \[front\]"
    assert text.startswith("## How do I <clean> the kettle?\n\nOpen the lid.\n\n![")
    assert "<img" not in text and "lost" not in text


def test_html_embeds_every_image_byte_for_byte(images):
    page = render.html_page([ANSWER], images)
    sources = re.findall(r'<img src="data:(image/\w+);base64,([^"]+)"', page)
    assert [kind for kind, _ in sources] == ["image/jpeg", "image/png"]
    for (_, encoded), name in zip(sources, ("lid", "kettle")):
        with open(images[name].path, "rb") as f:
            assert base64.b64decode(encoded) == f.read()
    assert "How do I &lt;clean&gt; the kettle?" in page and "<clean>" not in page
    assert "&lt;img" not in page and "file:" not in page


def test_an_answer_without_images_has_no_image_or_link(images, tmp_path):
    plain = render.RenderedAnswer("Why?", "Because it is so.", {})
    assert "![" not in render.markdown([plain], images, relative_to=str(tmp_path))
    assert "<img" not in render.html_page([plain], images)


def test_data_uri_of_a_file_that_is_not_an_image_names_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        render.data_uri(str(path))
