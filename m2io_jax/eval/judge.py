"""LLM-judge metrics of MRAMG-Bench, scored by a local model: relevance, effectiveness, position, overall.

Optional and off by default (`config.judge.enabled` of `m2io_jax/eval/config.py`): a judge model only reads, so
any local Qwen2-family checkpoint serves (`Judge.from_pretrained`); replies come from
`m2io_jax.sampling.generate`. The four rubrics are those of MRAMG-Bench's judge prompts
(`reference/m2io-and-mramg.md` section 5.5); each prompt shows the query, the answer with its images numbered
by position (`[text_1] <img_1> [text_2] <img_2> ...`) and, per image, its caption and the text around it in
its source document (`[context_above] <img> [context_below]`). The judge gives a short reason, then a tagged
score:

  relevance       one prompt per placed image, 1-5, `<relevance_score>N</relevance_score>`
  effectiveness   one prompt per placed image, 1-5, `<effective_score>N</effective_score>`
  position        one prompt per answer, 0/1 per image, `<img_k_score>0|1</img_k_score>` for k = 1..n
  overall         one prompt per answer, 1-5, `<overall_quality_score>N</overall_quality_score>`

Normalisation (as the third-party reference code): a 1-5 score counts score / 5, a position score its 0/1; a
question's relevance, effectiveness and position are the means over its images; tables show x100. A reply
without a valid tag (missing, out of range, not a number) scores 0, as in the reference, and is counted in
`unparsable` so that a weak judge is visible. [our choice] A question whose answer places no image has no
relevance, effectiveness or position score (None: left out of those means, counted in `no_image`); the
reference does not say what it does there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from m2io_jax import sampling
from m2io_jax.data import mramg
from m2io_jax.data import sentences as sentences_lib

RUBRICS = ("relevance", "effectiveness", "position", "overall")
PER_IMAGE = ("relevance", "effectiveness")  # one prompt per placed image; the others: one prompt per answer
TAGS = {"relevance": "relevance_score", "effectiveness": "effective_score", "overall": "overall_quality_score"}
_SCALE = 5.0

_SYSTEM = "You are a strict expert judge of multimodal answers, which interleave text with images."
_RUBRIC_TEXT = {
    "relevance": (
        "Rate how relevant image {marker} is to the query and to the content of the answer, from 1 to 5: "
        "1 completely unrelated; 2 mostly unrelated; 3 somewhat related; 4 clearly related; 5 highly related to "
        "the query and the answer content."),
    "effectiveness": (
        "Rate how effectively image {marker} helps the reader understand the answer, from 1 to 5: 1 harmful "
        "(misleading); 2 irrelevant; 3 partially effective; 4 mostly effective; 5 highly effective (it gives "
        "crucial details the text alone does not)."),
    "position": (
        "For each image of the answer, say whether its position is right: 1 if the image is relevant to at "
        "least one neighbouring text segment (before or after it) and its placement follows the logical flow "
        "and improves understanding; 0 if it is unrelated to both neighbours or its placement does not help."),
    "overall": (
        "Rate the overall quality of the multimodal answer, from 1 to 5: 1 poor (fails to answer, confusing, "
        "unhelpful images); 2 weak; 3 acceptable; 4 good; 5 excellent (detailed, cohesive structure, images "
        "that complement the text)."),
}


@dataclasses.dataclass(frozen=True)
class JudgedImage:
    """One placed image as the judge sees it: its position marker, caption and source-document context."""

    marker: str  # "<img_1>": the image's position in the answer (1-based)
    name: str
    caption: str
    context_above: str
    context_below: str


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: the query, the answer with `<img_k>` position markers and its images in order."""

    question_id: str
    query: str
    answer: str
    images: tuple[JudgedImage, ...]


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
    """One prompt: which item and rubric it scores, and for per-image rubrics which image (0-based)."""

    item: int
    rubric: str
    image: int | None
    prompt: str


@dataclasses.dataclass(frozen=True)
class JudgeScores:
    """A question's rubric scores in [0, 1] (None: not applicable, no image placed) and its unparsable replies."""

    question_id: str
    relevance: float | None
    effectiveness: float | None
    position: float | None
    overall: float
    unparsable: Mapping[str, int]


def image_contexts(documents: Mapping[str, mramg.Document]) -> dict[str, tuple[str, str]]:
    """{image name: (sentence above, sentence below)} from each image's place in its source document.

    The sentence above is the one the image follows (`sentences.locate_markers`); "" where there is none. The
    first document holding an image wins.
    """
    out: dict[str, tuple[str, str]] = {}
    for document in documents.values():
        marked = sentences_lib.locate_markers(document.content, sentences_lib.PIC_RE)
        texts = [span.text for span in marked.sentences]
        for name, follows in zip(document.images, marked.follows):
            above = texts[follows] if follows >= 0 else ""
            below = texts[follows + 1] if follows + 1 < len(texts) else ""
            out.setdefault(name, (above, below))
    return out


def judge_item(question_id: str, query: str, answer: str, image_names: Sequence[str],
               captions: Mapping[str, str], contexts: Mapping[str, tuple[str, str]]) -> JudgeItem:
    """The `JudgeItem` of an answer whose `<imgN>` markers stand, in order, for `image_names`.

    Raises:
      ValueError: the answer has a different number of markers than `image_names`.
    """
    markers = list(sentences_lib.IMG_RE.finditer(answer))
    if len(markers) != len(image_names):
        raise ValueError(f"question {question_id}: the answer has {len(markers)} <imgN> markers but "
                         f"{len(image_names)} image names were given; expected one name per marker, in order")
    position = iter(range(1, len(markers) + 1))
    numbered = sentences_lib.IMG_RE.sub(lambda _: f"<img_{next(position)}>", answer)
    images = tuple(
        JudgedImage(f"<img_{k + 1}>", name, captions.get(name, ""), *contexts.get(name, ("", "")))
        for k, name in enumerate(image_names))
    return JudgeItem(question_id, query, numbered, images)


def _image_block(image: JudgedImage) -> str:
    return (f"{image.marker} caption: {image.caption}\n"
            f"{image.marker} context: [context_above] {image.context_above} {image.marker} "
            f"[context_below] {image.context_below}")


def _position_format(count: int) -> str:
    return "\n".join(f"<img_{k}_score>0 or 1</img_{k}_score>" for k in range(1, count + 1))


def build_requests(items: Sequence[JudgeItem]) -> list[JudgeRequest]:
    """Every prompt needed to judge `items`: per image for relevance and effectiveness, per answer for
    position (answers with images only) and overall."""
    requests = []
    for index, item in enumerate(items):
        head = f"Query: {item.query}\n\nAnswer: {item.answer}\n"
        for rubric in RUBRICS:
            if rubric in PER_IMAGE:
                for k, image in enumerate(item.images):
                    task = _RUBRIC_TEXT[rubric].format(marker=image.marker)
                    reply = f"<{TAGS[rubric]}>N</{TAGS[rubric]}>"
                    prompt = (f"{head}\n{_image_block(image)}\n\n{task}\nGive a short reason, then the score as "
                              f"{reply}.")
                    requests.append(JudgeRequest(index, rubric, k, prompt))
            elif rubric == "position":
                if item.images:
                    blocks = "\n".join(_image_block(image) for image in item.images)
                    prompt = (f"{head}\n{blocks}\n\n{_RUBRIC_TEXT[rubric]}\nGive a short reason, then one line "
                              f"per image:\n{_position_format(len(item.images))}")
                    requests.append(JudgeRequest(index, rubric, None, prompt))
            else:
                blocks = "\n".join(_image_block(image) for image in item.images) or "(no image)"
                reply = f"<{TAGS[rubric]}>N</{TAGS[rubric]}>"
                prompt = (f"{head}\n{blocks}\n\n{_RUBRIC_TEXT[rubric]}\nGive a short reason, then the score as "
                          f"{reply}.")
                requests.append(JudgeRequest(index, rubric, None, prompt))
    return requests


def parse_scale(reply: str, rubric: str) -> float | None:
    """The first `<tag>N</tag>` score of a 1-5 rubric, normalised to N / 5; None when absent or out of range."""
    match = re.search(rf"<{TAGS[rubric]}>\s*(\d+)\s*</{TAGS[rubric]}>", reply)
    if match is None or not 1 <= int(match.group(1)) <= _SCALE:
        return None
    return int(match.group(1)) / _SCALE


def parse_positions(reply: str, count: int) -> list[float | None]:
    """The 0/1 score of each image k = 1..count from `<img_k_score>`; None where absent or not 0/1."""
    out: list[float | None] = []
    for k in range(1, count + 1):
        match = re.search(rf"<img_{k}_score>\s*(\d+)\s*</img_{k}_score>", reply)
        out.append(float(match.group(1)) if match is not None and match.group(1) in ("0", "1") else None)
    return out


def score_replies(items: Sequence[JudgeItem], requests: Sequence[JudgeRequest],
                  replies: Sequence[str]) -> list[JudgeScores]:
    """Each item's `JudgeScores` from the judge's replies to `requests` (one reply per request, in order)."""
    if len(replies) != len(requests):
        raise ValueError(f"{len(replies)} replies for {len(requests)} judge requests: expected one per request")
    values: list[dict[str, list[float]]] = [{rubric: [] for rubric in RUBRICS} for _ in items]
    unparsable = [dict.fromkeys(RUBRICS, 0) for _ in items]
    for request, reply in zip(requests, replies):
        if request.rubric == "position":
            parsed = parse_positions(reply, len(items[request.item].images))
        else:
            parsed = [parse_scale(reply, request.rubric)]
        unparsable[request.item][request.rubric] += sum(value is None for value in parsed)
        values[request.item][request.rubric] += [0.0 if value is None else value for value in parsed]

    def mean(scores: list[float]) -> float | None:
        return math.fsum(scores) / len(scores) if scores else None

    return [JudgeScores(item.question_id, mean(v["relevance"]), mean(v["effectiveness"]), mean(v["position"]),
                        mean(v["overall"]), unparsable[i])
            for i, (item, v) in enumerate(zip(items, values))]


def aggregate(scores: Sequence[JudgeScores]) -> dict[str, float | int | None]:
    """Means x100 of each rubric over the questions it applies to, the number of questions, those with no
    image placed, and the unparsable replies per rubric (`unparsable/<rubric>`)."""
    out: dict[str, float | int | None] = {}
    for rubric in RUBRICS:
        applicable = [getattr(s, rubric) for s in scores if getattr(s, rubric) is not None]
        out[rubric] = 100.0 * math.fsum(applicable) / len(applicable) if applicable else None
    out["questions"] = len(scores)
    out["no_image"] = sum(s.relevance is None for s in scores)
    for rubric in RUBRICS:
        out[f"unparsable/{rubric}"] = sum(s.unparsable[rubric] for s in scores)
    return out


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as a user turn after the judge's system turn, ending where the assistant's reply starts: the
    tokenizer's chat template when it has one, otherwise the Qwen ChatML layout."""
    messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n"


class Judge:
    """A local judge model: `score(items)` builds the rubric prompts, generates replies and parses them."""

    def __init__(self, model: Any, tokenizer: Any, config: ml_collections.ConfigDict):
        """`config`: the `judge` section of `m2io_jax/eval/config.py` (max_new_tokens, batch_size,
        temperature, seed)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.stop_tokens = tuple(t for t in stops if t is not None and t != tokenizer.unk_token_id)
        if not self.stop_tokens:
            raise ValueError("judge tokenizer has neither <|im_end|> nor <|endoftext|>: expected a Qwen-family "
                             "tokenizer (the judge stops its reply there)")

    @classmethod
    def from_pretrained(cls, path: str, config: ml_collections.ConfigDict) -> Judge:
        """The judge of a local Hugging Face Qwen2-family directory (config.json, weights, tokenizer files)."""
        from transformers import AutoTokenizer

        from m2io_jax import models

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"config.judge.checkpoint={path!r}: no config.json there; expected a local "
                                    f"Hugging Face Qwen2-family directory")
        return cls(models.from_pretrained(path), AutoTokenizer.from_pretrained(path), config)

    def replies(self, prompts: Sequence[str]) -> list[str]:
        """The judge's reply to each prompt (`sampling.generate`, `batch_size` prompts per call)."""
        token_ids = [self.tokenizer(chat_prompt(self.tokenizer, text), add_special_tokens=False)["input_ids"]
                     for text in prompts]
        out = []
        for start in range(0, len(token_ids), self.config.batch_size):
            sampled = sampling.generate(self.model, token_ids[start:start + self.config.batch_size],
                                        max_new_tokens=self.config.max_new_tokens,
                                        temperature=self.config.temperature, stop_tokens=self.stop_tokens,
                                        seed=self.config.seed)
            out += [self.tokenizer.decode([t for t in tokens if t not in self.stop_tokens])
                    for tokens in sampled.tokens]
        return out

    def score(self, items: Sequence[JudgeItem]) -> list[JudgeScores]:
        """Every item's `JudgeScores`: its rubric prompts (`build_requests`), the model's replies, their parse."""
        requests = build_requests(items)
        return score_replies(items, requests, self.replies([r.prompt for r in requests]) if requests else [])
