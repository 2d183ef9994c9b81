"""The inserter prompt: text, numbered sentences, one image entry per candidate in file order, captions option."""

import jinja2
import pytest

from m2io_jax.data import mramg
from m2io_jax.inserter import prompt as prompt_lib
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.config import get_inserter_config
from m2io_jax.inserter.example import InsertionExample
from m2io_jax.models.qwen2_5_vl_processor import DEFAULT_CHAT_TEMPLATE, IMAGE_PAD

IMAGES = {n: mramg.ImageInfo(n, f"cap {n}", f"/img/{n}.png") for n in ("lamp", "shade")}


def _example(image_map=None):
    image_map = {"img1": "shade", "img2": "lamp"} if image_map is None else image_map
    candidates = Candidates(
        question_id="q1", dataset="x", chunks=(), contexts=(), image_map=image_map,
        captions=tuple(f"cap {name}" for name in image_map.values()), gold=(), gold_missing=(), added_gold=(),
    )
    return InsertionExample("How do I fit the shade?", "Hold the lamp. Turn the shade clockwise.", candidates)


def _config(**fields):
    config = get_inserter_config()
    config.update(fields)
    return config


def _text(prompt, image="<IMAGE>"):
    (message,) = prompt.messages
    assert message["role"] == "user"
    return "".join(part["text"] if part["type"] == "text" else image for part in message["content"])


def test_prompt_text_and_image_order():
    prompt = prompt_lib.build_prompt(_example(), IMAGES, _config())
    assert prompt.image_files == ("/img/shade.png", "/img/lamp.png")
    assert _text(prompt) == (
        "Question: How do I fit the shade?\n\n"
        "Answer, one numbered sentence per line:\n[1] Hold the lamp.\n[2] Turn the shade clockwise.\n\n"
        "Candidate images:\n<img1>: <IMAGE> Caption: cap shade\n<img2>: <IMAGE> Caption: cap lamp\n\n"
        + prompt_lib.instruction("anchors", think=False)
    )


def test_captions_withheld():
    text = _text(prompt_lib.build_prompt(_example(), IMAGES, _config(prompt={"show_captions": False})))
    assert "Caption" not in text and "cap shade" not in text
    assert "Candidate images:\n<img1>: <IMAGE>\n<img2>: <IMAGE>\n\n" in text


def test_no_candidates():
    prompt = prompt_lib.build_prompt(_example(image_map={}), IMAGES, _config())
    assert prompt.image_files == () and "Candidate images: none\n\n" in _text(prompt)


@pytest.mark.parametrize("output_format, think, expected", [
    ("anchors", False, "<img3>@2 <img1>@5"),
    ("inline", False, "exactly as given"),
    ("anchors", True, "<think></think>"),
])
def test_instruction_follows_the_config(output_format, think, expected):
    text = _text(prompt_lib.build_prompt(_example(), IMAGES, _config(output_format=output_format, think=think)))
    assert expected in text and text.endswith(prompt_lib.instruction(output_format, think))
    assert ("<think>" in text) is think


def test_chat_template_gets_one_image_pad_per_file():
    prompt = prompt_lib.build_prompt(_example(), IMAGES, _config())
    rendered = jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(messages=list(prompt.messages), add_generation_prompt=True)
    assert rendered.count(IMAGE_PAD) == len(prompt.image_files) == 2
    assert "<img1>: <|vision_start|><|image_pad|><|vision_end|> Caption: cap shade" in rendered


def test_missing_image_file_is_named():
    images = {"shade": IMAGES["shade"], "lamp": mramg.ImageInfo("lamp", "cap lamp", "")}
    with pytest.raises(ValueError, match=r"q1: candidate <img2> image 'lamp' has no file path"):
        prompt_lib.build_prompt(_example(), images, _config())
    with pytest.raises(ValueError, match="'lamp' has no metadata"):
        prompt_lib.build_prompt(_example(), {"shade": IMAGES["shade"]}, _config())
