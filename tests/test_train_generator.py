"""The demo generators' training: a few SFT steps of both modes, then the saved generators answer questions."""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from m2io_jax import cli, generator, train_generator
from m2io_jax.data import mramg
from m2io_jax.data.demo import demo_root
from m2io_jax.eval import metrics
from m2io_jax.retrieval import index_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def small_config():
    config = cli.load_config(f"{ROOT}/configs/demo_generator.py")
    config.data.datasets = ("demo_recipe",)
    config.sft.num_steps = STEPS
    config.sft.batch_size = 4
    config.sft.optimizer.warmup_steps = 1
    config.eval.max_examples = 2
    config.generator.max_new_tokens = 16
    config.generator.batch_size = 2
    config.model.tiny.vocab_size = 600
    config.model.tiny.text_shape.hidden_size = 32
    config.model.tiny.text_shape.intermediate_size = 64
    config.print_every = 1
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("generators"))
    return workdir, train_generator.train_generators(small_config(), workdir)


def test_both_generators_are_trained_evaluated_and_saved(trained):
    workdir, results = trained
    assert set(results) == {"text", "llm"}
    for mode, stages in results.items():
        assert set(stages) == {"init", "sft"}
        assert stages["sft"]["examples"] == 2 and 0.0 <= stages["sft"]["rouge_l"] <= 1.0
        assert os.path.isfile(os.path.join(workdir, generator.CHECKPOINT_DIRS[mode], "config.json"))
    assert "image_f1" in results["llm"]["sft"] and "image_f1" not in results["text"]["sft"]
    with open(os.path.join(workdir, "generator_eval.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    with open(os.path.join(workdir, "generator_metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["mode"], r["step"]) for r in records] == [(m, s) for m in ("text", "llm") for s in range(1, STEPS + 1)]
    losses = [r["loss"] for r in records if r["mode"] == "text"]
    assert losses[-1] < losses[0]  # 3 steps at the demo's learning rate already lower the loss
    assert os.path.isfile(os.path.join(index_cache.index_dir(workdir), "demo_recipe", index_cache.MANIFEST))


def test_saved_generator_answers_a_question(trained):
    workdir, _ = trained
    config = small_config().generator
    path = generator.checkpoint_path(config, workdir)
    answers = generator.Generator.from_pretrained(path, config).answer(
        ["How do I make the tart?"], [["Mix the flour and the butter.", "Bake it for twenty minutes."]])
    assert len(answers) == 1 and 1 <= answers[0].num_tokens <= config.max_new_tokens
    llm = generator.Generator.from_pretrained(generator.checkpoint_path(config, workdir, "llm"), config)
    (answer,) = llm.answer(["How do I make the tart?"], [["Mix the flour.<img1>"]], [[("img1", "flour in a bowl")]])
    assert isinstance(answer.text, str) and answer.num_tokens >= 1


def test_training_examples_match_the_answer_path(tmp_path):
    """The llm examples' targets are the gold answers with the candidates' placeholders; text targets have none."""
    config = small_config()
    (dataset,) = train_generator.sources.load_datasets(config.data, image_dir=str(tmp_path))

    class FirstWords:
        def encode(self, texts, batch_size=64):
            out = np.zeros((len(texts), 64), np.float32)  # [N, D]
            for row, text in enumerate(texts):
                for word in text.lower().split()[:40]:
                    out[row, zlib.crc32(word.encode()) % 64] += 1.0
            return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)

    retrievers = index_cache.load_or_build(str(tmp_path / "index"), config.data, FirstWords(), [dataset],
                                           log=lambda line: None)
    examples = train_generator.build_examples(config, [dataset], retrievers)
    questions = {q.question: q for q in mramg.load_dataset(demo_root(), "demo_recipe").questions}
    for text, llm in zip(examples["text"]["train"], examples["llm"]["train"]):
        assert text.question == llm.question and text.images is None and llm.images is not None
        assert "<img" not in text.target and "<img" not in " ".join(text.passages)
        gold = questions[llm.question].images
        assert len(llm.gold_images) == len(gold)  # missed gold images are added for training questions
        assert metrics.image_markers(llm.target) == list(llm.gold_images)
        assert metrics.strip_image_markers(llm.target) == text.target


def test_unknown_mode_is_a_one_line_error(tmp_path):
    """Also reads the package default config (no --config)."""
    proc = subprocess.run([sys.executable, "-m", "m2io_jax.train_generator", f"--workdir={tmp_path}",
                           "--config.modes=('text','nope')"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and "config.modes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
