"""Fixtures that write tiny MRAMG-Bench datasets in the exact official on-disk layouts."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

# Two documents, three images, four questions; doc 2 is cited by two questions (they must split together).
DOCS = [
    [1, "The red kite flies high.<PIC> It was built in 1990. The green tree is old.<PIC>", ["wit_a", "wit_b"]],
    [2, "A blue boat floats on the sea.<PIC> Fishermen use it daily.", ["wit_c"]],
]
QUESTIONS = [
    {
        "id": "q1",
        "question": "What colour is the kite?",
        "provenance": [1],
        "ground_truth": "The kite is red.<PIC> It flies high.",
        "images_list": ["wit_a"],
    },
    {
        "id": "q2",
        "question": "Describe the boat.",
        "provenance": [2],
        "ground_truth": "The boat is blue.<PIC>",
        "images_list": ["wit_c"],
    },
    {
        "id": "q3",
        "question": "Who uses the boat?",
        "provenance": [2],
        "ground_truth": "Fishermen use it daily.",
        "images_list": [],
    },
    {
        "id": "q4",
        "question": "Kite and tree?",
        "provenance": [1],
        "ground_truth": "A red kite.<PIC> An old tree.<PIC>",
        "images_list": ["wit_a", "wit_b"],
    },
]
COLOURS = {"wit_a": (200, 0, 0), "wit_b": (0, 160, 0), "wit_c": (0, 0, 200)}


def write_mramg(
    root: str,
    name: str = "wit",
    *,
    docs=DOCS,
    questions=QUESTIONS,
    object_docs: bool = False,
    image_layout: str = "IMAGE/IMAGE",
    doc_lines_extra: tuple[str, ...] = (),
) -> str:
    """Writes dataset `name` under `root`; image_layout is the prefix of `images/` and `images_info/`."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"doc_{name}.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            value = {"id": d[0], "content": d[1], "images_list": d[2]} if object_docs else d
            f.write(json.dumps(value) + "\n")
        for line in doc_lines_extra:
            f.write(line + "\n")
    with open(os.path.join(root, f"{name}_mqa.jsonl"), "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    base = os.path.join(root, image_layout) if image_layout else root
    image_dir = os.path.join(base, "images", name.upper())
    info_dir = os.path.join(base, "images_info")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(info_dir, exist_ok=True)
    info = {}
    for image_name in sorted({i for d in docs for i in d[2]}):
        rel = f"{image_name}.jpg"
        Image.new("RGB", (16, 12), COLOURS.get(image_name, (90, 90, 90))).save(
            os.path.join(image_dir, rel), format="JPEG"
        )
        info[image_name] = {"image_caption": f"caption of {image_name}", "image_path": rel, "image_url": "http://x"}
    with open(os.path.join(info_dir, f"{name}_imgs_collection.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return root


@pytest.fixture
def mramg_root(tmp_path) -> str:
    return write_mramg(str(tmp_path / "mramg"))


@pytest.fixture
def make_mramg():
    """The `write_mramg` function, for tests that need a variant layout or bad input."""
    return write_mramg
