"""The answer generator: a Qwen2-family text model that writes the answer to a question from retrieved passages.

    generator = Generator.from_pretrained("/data/Qwen2.5-3B-Instruct", get_generator_config())
    answers = generator.answer(["How do I clean the kettle?"], [["passage 1", "passage 2"]])
    answers[0].text, answers[0].num_tokens

Two modes, one prompt builder (`prompt_messages`, which the demo generator's training uses too):
  text  the question and its top passages; the model writes the answer text (the inserter adds images later).
  llm   MRAMG-Bench's LLM-based method: the prompt also lists the candidate images (`images`: per question,
        (id, caption) pairs such as ("img3", "a red kettle")) and the model writes `<img3>`-style placeholders
        itself, in one pass. Passages may then carry `<imgN>` markers where their images stand.

`answer` is batched (`config.batch_size` questions per `m2io_jax.sampling.generate` call; prompt lengths and
batch sizes padded to `config.buckets`). A prompt over `config.max_prompt_tokens` loses its lowest-ranked
passages one at a time (then, in the llm mode, its last-listed images) until it fits; `GeneratedText` says how
many were dropped. Any local Qwen2-family Hugging Face directory with tokenizer files works; its tokenizer's
chat template is used, or the plain Qwen ChatML template (`CHAT_TEMPLATE`) when it carries none.

This module also holds `get_config()`, the default config of `python -m m2io_jax.train_generator` (which
trains the demo's tiny generators into `{workdir}/generator` and `{workdir}/generator_llm`), so that the
command's defaults need no repository `configs/` folder. `m2io_jax.cli` executes the default config's file as a
module of its own, which is why this one has no `from __future__ import annotations` (dataclasses with string
annotations need their module registered).
"""

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections

from m2io_jax import cli, models, sampling, train_config
from m2io_jax.inserter.candidates import Candidates
from m2io_jax.inserter.task import decode_completion
from m2io_jax.models import tiny
from m2io_jax.retrieval.chunking import Chunk
from m2io_jax.rl import config as rl_config

TEXT, LLM = "text", "llm"
MODES = (TEXT, LLM)
CHECKPOINT_DIRS = {TEXT: "generator", LLM: "generator_llm"}
"""Where `python -m m2io_jax.train_generator` writes each mode's generator inside its workdir."""

END_OF_TURN = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's ChatML for text messages: used when a checkpoint's tokenizer has no chat template (the tiny ones)."""

_MARKER_RE = re.compile(r"<img\d+>|<PIC>")
_SYSTEM = "You are a helpful assistant. Answer the question using the passages."
_TEXT_INSTRUCTION = "Answer the question in a few sentences, using only the passages."
_LLM_INSTRUCTION = (
    "Answer the question in a few sentences, using only the passages. Where one of the images above illustrates "
    "a sentence of your answer, write its placeholder (for example <img1>) right after that sentence. Use each "
    "image at most once and only images that fit; write no placeholder when none fits.")


def get_generator_config() -> ml_collections.ConfigDict:
    """The generator's settings (the `generator` section of the configs that use it).

    Fields:
      checkpoint: local Qwen2-family Hugging Face directory of the `text` mode's generator; "" = the demo
        generator in `{workdir}/generator` (`checkpoint_path`).
      llm_checkpoint: the same for the `llm` mode; "" = `{workdir}/generator_llm`.
      dtype: parameter and compute dtype ("float32" or "bfloat16").
      top_k: passages shown in the prompt (the first `top_k` of those given, best first).
      max_prompt_tokens: prompt budget in tokens (chat template included); over it, passages are dropped.
      max_new_tokens: answer budget in tokens.
      temperature: 0 decodes greedily; > 0 samples (seeded by `seed`).
      seed: the sampler's seed.
      batch_size: questions per `sampling.generate` call.
      buckets.prompt_lengths / new_token_lengths / batch_sizes: static sizes the sampler pads to; () = powers
        of two (`sampling.Buckets`).
    """
    c = ml_collections.ConfigDict()
    c.checkpoint = ""
    c.llm_checkpoint = ""
    c.dtype = "float32"
    c.top_k = 3
    c.max_prompt_tokens = 1024
    c.max_new_tokens = 128
    c.temperature = 0.0
    c.seed = 0
    c.batch_size = 8
    c.buckets = ml_collections.ConfigDict()
    c.buckets.prompt_lengths = ()
    c.buckets.new_token_lengths = ()
    c.buckets.batch_sizes = ()
    return c


def get_config() -> ml_collections.ConfigDict:
    """The default config of `python -m m2io_jax.train_generator` (the demo generators' SFT).

    Sections:
      data       the training run's data section (`m2io_jax.train_config`: data_dir, datasets, source, split
                 rule, retrieval), so that both commands read the same corpus and split the same way.
      generator  `get_generator_config()`: the prompt settings used both to train and to answer.
      modes      which generators to train: "text" (answers) and / or "llm" (answers with placeholders).
      model      tiny: vocab_size, text_shape (`m2io_jax.models.tiny.TEXT_SHAPE` fields), seed of the tiny Qwen2
                 built into `{workdir}/generator_init` (its tokenizer trained on the corpus and the prompts).
      sft        num_steps, batch_size and the optimizer (`m2io_jax.rl.config`); the trainer's grpo and rollout
                 sections (rollout: prompt and target length buckets).
      eval       max_examples of the validation split to answer greedily before and after training (0 = all).
      seed; print_every (steps between progress lines); compilation_cache_dir ("" = off).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.print_every = 25
    c.compilation_cache_dir = "~/.cache/m2io_jax/jax_cache"
    c.data = train_config.get_config().data
    c.generator = get_generator_config()
    c.modes = MODES

    c.model = ml_collections.ConfigDict()
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.vocab_size = 2048
    c.model.tiny.text_shape = dict(tiny.TEXT_SHAPE)
    c.model.tiny.seed = 0

    c.sft = ml_collections.ConfigDict()
    c.sft.num_steps = 200
    c.sft.batch_size = 8
    c.sft.optimizer = rl_config.get_optimizer_config()
    c.sft.optimizer.total_steps = c.sft.get_ref("num_steps")
    c.grpo = rl_config.get_grpo_config()
    c.rollout = rl_config.get_rollout_config()

    c.eval = ml_collections.ConfigDict()
    c.eval.max_examples = 0
    return c


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    """One answer.

    text: the answer (in the llm mode with `<imgN>` placeholders), special tokens and the stop token removed.
    num_tokens: tokens the generator decoded for it (the stop token included).
    prompt_tokens: tokens of its prompt.
    dropped_passages: passages (and, llm mode, images) left out to fit `max_prompt_tokens`.
    """

    text: str
    num_tokens: int
    prompt_tokens: int = 0
    dropped_passages: int = 0


def prompt_messages(question: str, passages: Sequence[str],
                    images: Sequence[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """The chat messages (system, user) asking for the answer to `question` from `passages`, best first.

    `images` None is the text mode: image markers (`<imgN>`, `<PIC>`) are removed from the passages, so that the
    model never sees a placeholder it should not write. Otherwise (the llm mode) the passages keep their
    markers and the candidate images are listed as `[imgN_caption] caption` (MRAMG-Bench's generation format),
    with the instruction to write placeholders after the sentences they illustrate.
    """
    if images is None:
        passages = [" ".join(_MARKER_RE.sub(" ", p).split()) for p in passages]
    lines = [f"[context_{i + 1}] {p}" for i, p in enumerate(passages)]
    if images is not None:
        lines += [f"[{tag}_caption] {caption}" for tag, caption in images]
    lines += [f"Question: {question}", _TEXT_INSTRUCTION if images is None else _LLM_INSTRUCTION]
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def text_passages(chunks: Sequence[Chunk]) -> list[str]:
    """The text mode's passages: the retrieved chunks' text without image markers, best first."""
    return [chunk.plain_text for chunk in chunks]


def llm_inputs(candidates: Candidates) -> tuple[list[str], list[tuple[str, str]]]:
    """The llm mode's passages and images for one question: the candidates' contexts (`<imgN>` where their images
    stand) and (id, caption) of each candidate image. The answer's `<imgN>` map to images via
    `candidates.image_map`."""
    return list(candidates.contexts), list(zip(candidates.image_map, candidates.captions))


def checkpoint_path(config: ml_collections.ConfigDict, workdir: str, mode: str = TEXT) -> str:
    """The generator directory of `mode`: the config's (`checkpoint` / `llm_checkpoint`) or the demo generator's in
    `workdir`. Raises `cli.UserError` naming the command that creates it when it holds no config.json."""
    if mode not in MODES:
        raise ValueError(f"generator mode {mode!r}: expected one of {MODES}")
    field = "checkpoint" if mode == TEXT else "llm_checkpoint"
    path = config[field] or os.path.join(workdir, CHECKPOINT_DIRS[mode])
    if not os.path.isfile(os.path.join(path, "config.json")):
        if config[field]:
            raise cli.UserError(f"config.generator.{field}={path}: no config.json there (expected a local Qwen2-family "
                                f"Hugging Face directory)")
        raise cli.UserError(f"{path}: no generator there; train the demo generators with python -m "
                            f"m2io_jax.train_generator --config=configs/demo_generator.py --workdir={workdir}, or set "
                            f"config.generator.{field} to a local Qwen2-family checkpoint")
    return path


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """End of turn and end of text: the tokens that end an answer."""
    ids = tuple(tokenizer.convert_tokens_to_ids(token) for token in (END_OF_TURN, END_OF_TEXT))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer maps ({END_OF_TURN}, {END_OF_TEXT}) to {ids}; expected both as tokens "
                         f"(a Qwen2-family tokenizer)")
    return ids


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (else `CHAT_TEMPLATE`), ending with the assistant
    header."""
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer: Any, question: str, passages: Sequence[str], images: Sequence[tuple[str, str]] | None,
               max_tokens: int) -> tuple[list[int], int]:
    """The prompt's token ids within `max_tokens`, dropping the last passages (then, llm mode, the last images)
    one at a time; returns (ids, how many were dropped). Raises ValueError when even the bare question is over."""
    passages = list(passages)
    listed = None if images is None else list(images)
    dropped = 0
    while True:
        ids = encode_prompt(tokenizer, prompt_messages(question, passages, listed))
        if len(ids) <= max_tokens:
            return ids, dropped
        if passages:
            passages.pop()
        elif listed:
            listed.pop()
        else:
            raise ValueError(f"question {question[:60]!r}: its prompt alone has {len(ids)} tokens, over "
                             f"max_prompt_tokens={max_tokens}")
        dropped += 1


def decode_answer(tokenizer: Any, token_ids: Sequence[int], stop_tokens: Sequence[int]) -> str:
    """The answer text: tokens up to the first stop token, special tokens skipped, outer whitespace stripped."""
    return decode_completion(tokenizer, token_ids, stop_tokens, skip_special_tokens=True).strip()


def sampler_buckets(config: ml_collections.ConfigDict) -> sampling.Buckets:
    """`config.buckets` as `sampling.Buckets` (an empty tuple: powers of two)."""
    b = config.buckets
    return sampling.Buckets(prompt_lengths=tuple(b.prompt_lengths) or None,
                            new_token_lengths=tuple(b.new_token_lengths) or None,
                            batch_sizes=tuple(b.batch_sizes) or None)


class Generator:
    """A Qwen2-family model, its tokenizer and the generator config (module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, config: ml_collections.ConfigDict):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stop_tokens = stop_token_ids(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, config: ml_collections.ConfigDict, *, mesh: Any = None) -> "Generator":
        """The model and tokenizer of the local Hugging Face directory `path` (Qwen2 family, tokenizer files);
        with `mesh` (`m2io_jax.sharding.make_mesh`), the parameters are loaded straight into their shards."""
        from transformers import AutoTokenizer

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}/config.json: missing (expected a local Qwen2-family Hugging Face "
                                    f"directory with its tokenizer files)")
        if config.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"config.generator.dtype={config.dtype!r}: expected 'float32' or 'bfloat16'")
        model = models.from_pretrained(path, dtype=jnp.dtype(config.dtype), mesh=mesh)
        return cls(model, AutoTokenizer.from_pretrained(path), config)

    def answer(self, questions: Sequence[str], passages: Sequence[Sequence[str]],
               images: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[GeneratedText]:
        """One answer per question from its passages (best first; the first `config.top_k` are shown).

        `images` (per question, (id, caption) pairs such as ("img3", "caption")) switches on the llm mode: the
        prompt lists them and the answer may hold their `<imgN>` placeholders. An empty question is an error.
        """
        if len(passages) != len(questions) or (images is not None and len(images) != len(questions)):
            raise ValueError(f"{len(questions)} questions but passages for {len(passages)}"
                             + ("" if images is None else f" and images for {len(images)}")
                             + ": expected one list per question")
        for i, question in enumerate(questions):
            if not question or not question.strip():
                raise ValueError(f"questions[{i}] is empty: expected the text of a question")
        c = self.config
        prompts, dropped = [], []
        for i, question in enumerate(questions):
            ids, n = fit_prompt(self.tokenizer, question.strip(), list(passages[i])[:c.top_k],
                                None if images is None else images[i], c.max_prompt_tokens)
            prompts.append(ids)
            dropped.append(n)
        out: list[GeneratedText] = []
        for start in range(0, len(prompts), c.batch_size):
            batch = prompts[start:start + c.batch_size]
            sampled = sampling.generate(self.model, batch, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                        stop_tokens=self.stop_tokens, seed=c.seed, buckets=sampler_buckets(c))
            for j, tokens in enumerate(sampled.tokens):
                out.append(GeneratedText(text=decode_answer(self.tokenizer, tokens, self.stop_tokens),
                                         num_tokens=len(tokens), prompt_tokens=len(batch[j]),
                                         dropped_passages=dropped[start + j]))
        return out
