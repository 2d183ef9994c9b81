"""The inserter's prompt: question, numbered answer sentences, candidate images with captions, instruction.

One user message in the Hugging Face chat format. Each candidate is written as `<imgN>: ` followed by an
`{"type": "image"}` entry, where `Qwen2_5_VLProcessor` puts that image's vision tokens, then (unless captions
are withheld) its caption. `InserterPrompt.image_files` lists the image files in the order of those entries,
which is the order the processor takes images in:

    prompt = build_prompt(example, dataset.images, config)
    batch = processor([prompt.messages], images=[prompt.image_files])

Sentences are numbered as `formats.anchor_number` numbers them, so `<img3>@2` refers to the line `[2]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from m2io_jax.data import mramg
from m2io_jax.inserter import formats
from m2io_jax.inserter.example import InsertionExample

_CHOOSE = "Choose the candidate images that illustrate the answer and where each one goes."
_RULES = "Use only the candidates above, each at most once."
_INSTRUCTIONS = {
    formats.ANCHORS: (
        f"{_CHOOSE} Reply with {formats.ANSWER_OPEN}, then one item <imgN>@k per chosen image, separated by "
        f"spaces, then {formats.ANSWER_CLOSE}: <imgN>@k puts image <imgN> right after sentence [k] (k = 0: "
        f"before the first sentence). {_RULES} If no image fits, reply {formats.ANSWER_OPEN}"
        f"{formats.ANSWER_CLOSE}. Example: {formats.ANSWER_OPEN}<img3>@2 <img1>@5{formats.ANSWER_CLOSE}"
    ),
    formats.INLINE: (
        f"{_CHOOSE} Reply with {formats.ANSWER_OPEN}, then the answer text exactly as given (without the "
        f"sentence numbers) with each chosen image's <imgN> written right after the sentence it illustrates, "
        f"then {formats.ANSWER_CLOSE}. {_RULES} If no image fits, reply with the answer unchanged."
    ),
}
_THINK = f"First reason inside {formats.THINK_OPEN}{formats.THINK_CLOSE}, then give your reply. "


@dataclasses.dataclass(frozen=True)
class InserterPrompt:
    """A chat conversation for the processor and the image files its `{"type": "image"}` entries stand for."""

    messages: tuple[dict[str, Any], ...]
    image_files: tuple[str, ...]


def instruction(output_format: str, think: bool) -> str:
    """What the inserter is asked to do and how to write its reply, in `output_format`."""
    return (_THINK if think else "") + _INSTRUCTIONS[formats.check_format(output_format)]


def build_prompt(
    example: InsertionExample, images: Mapping[str, mramg.ImageInfo], config: ml_collections.ConfigDict
) -> InserterPrompt:
    """The prompt of `example` under the inserter `config` (output_format, think, prompt.show_captions).

    Args:
      example: the question, the answer text and the candidates.
      images: image metadata by name (the dataset's `images`): where each candidate's file is.

    Raises:
      ValueError: a candidate image has no metadata or no file.
    """
    candidates = example.candidates
    numbered = "\n".join(f"[{formats.anchor_number(i)}] {sentence}" for i, sentence in enumerate(example.sentences))
    content: list[dict[str, Any]] = []
    text = f"Question: {example.question}\n\nAnswer, one numbered sentence per line:\n{numbered}\n\nCandidate images:"
    files = []
    for (tag, name), caption in zip(candidates.image_map.items(), candidates.captions):
        info = images.get(name)
        if info is None or not info.path:
            raise ValueError(
                f"question {candidates.question_id}: candidate <{tag}> image {name!r} has "
                f"{'no metadata' if info is None else 'no file path'}; expected an ImageInfo with the file's path"
            )
        content += [{"type": "text", "text": f"{text}\n<{tag}>: "}, {"type": "image"}]
        files.append(info.path)
        text = f" Caption: {caption}" if config.prompt.show_captions else ""
    if not files:
        text += " none"
    content.append({"type": "text", "text": f"{text}\n\n{instruction(config.output_format, config.think)}"})
    return InserterPrompt(messages=({"role": "user", "content": content},), image_files=tuple(files))
