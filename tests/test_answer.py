"""python -m m2io_jax.answer: reading questions (plain lines, JSONL with ids), its one-line errors (empty question,
missing checkpoint), the per-stage totals, and (slow) the acceptance run: a few-step tiny inserter and generator,
then the command on a demo question, its Markdown and HTML holding the images the inserter chose, the HTML
opened in headless Chromium with every image decoded, and a screenshot kept."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from m2io_jax import answer, cli, render, systems
from m2io_jax.data import mramg
from m2io_jax.inserter import sources
from m2io_jax.inserter.sources import SplitDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DATASET = "demo_manual"


def test_questions_come_from_the_flag_then_the_file(tmp_path):
    plain = tmp_path / "questions.txt"
    plain.write_text("How do I clean it?\n\n  Where is the lid?  \n")
    assert answer.read_questions("Why?", str(plain)) == [
        {"question": "Why?"}, {"question": "How do I clean it?"}, {"question": "Where is the lid?"}]
    lines = tmp_path / "questions.jsonl"
    lines.write_text('{"question": "How do I clean it?", "id": 7}\n\n{"question": "Why?"}\n')
    assert answer.read_questions(None, str(lines)) == [{"question": "How do I clean it?", "id": "7"},
                                                       {"question": "Why?"}]


@pytest.mark.parametrize("content, message", [
    ('{"question": "Why?"}\n{"question": \n', r"questions.jsonl:2: invalid JSON"),
    ('{"question": "Why?"}\n["Why?"]\n', r"questions.jsonl:2: expected an object with a \"question\" string"),
    ('{"question": "Why?"}\n{"question": "  "}\n', r"questions.jsonl:2: the question is empty"),
])
def test_bad_question_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(content)
    with pytest.raises(cli.UserError, match=message):
        answer.read_questions(None, str(path))


def test_no_or_empty_question_is_a_user_error():
    with pytest.raises(cli.UserError, match="no question"):
        answer.read_questions(None, None)
    with pytest.raises(cli.UserError, match="--question: the question is empty"):
        answer.read_questions(" \t", None)


def test_dataset_ids_take_the_dataset_question_and_oracle_text_needs_them():
    known = mramg.Question(id="m7", question="How?", provenance=("d1",), ground_truth="Like this.<PIC>",
                           images=("a",), dataset=DATASET, answer="Like this.")
    dataset = SplitDataset(DATASET, (known,), {"m7": "test"}, {}, {})
    found = answer.as_questions([{"question": "ignored", "id": "m7"}, {"question": " Why? "}], dataset, "m2io")
    assert found[0] is known
    assert (found[1].id, found[1].question, found[1].images, found[1].dataset) == ("q2", "Why?", (), DATASET)
    assert answer.as_questions([{"question": "x", "id": "m7"}], dataset, "oracle-text") == [known]
    with pytest.raises(cli.UserError, match="oracle-text inserts into the gold answer"):
        answer.as_questions([{"question": "Why?"}], dataset, "oracle-text")


def test_stage_totals_count_each_batch_once():
    def one(batch_size, seconds, generated):
        return systems.SystemAnswer("q", "", [], {}, {"retrieve": seconds, "generate": 2 * seconds, "insert": 0.5},
                                    {"generate": generated, "insert": 3}, batch_size)

    answers = [one(2, 1.0, 5), one(2, 1.0, 6), one(1, 4.0, 7)]
    seconds, tokens, batches = answer.stage_totals(answers)
    assert seconds == {"retrieve": 5.0, "generate": 10.0, "insert": 1.0}
    assert tokens == {"generate": 18, "insert": 9} and batches == 2


def _run_answer(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "m2io_jax.answer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_command_errors_are_one_line(tmp_path):
    config = f"--config={os.path.join(CONFIGS, 'tiny.py')}"
    empty = _run_answer(config, f"--workdir={tmp_path}", "--question=")
    assert empty.returncode == 1
    assert empty.stderr.strip().splitlines() == ["answer: error: --question: the question is empty; expected the "
                                                 "text of a question"]
    missing = _run_answer(f"--workdir={tmp_path}", "--question=How do I clean the kettle?")  # default config
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}/final: no inserter checkpoint" in missing.stderr
    assert f"python -m m2io_jax.train --config=CONFIG --workdir={tmp_path}" in missing.stderr


def _shrink_inserter(config):
    """A few tiny steps of the inserter on demo_manual (tests/test_train.py's shrink, with enough SFT steps that
    the tiny inserter writes well-formed placements)."""
    config.data.datasets = (DATASET,)
    config.sft.num_steps = SFT_STEPS
    config.grpo.num_steps = 2
    config.sft.optimizer.warmup_steps = config.optimizer.warmup_steps = 0
    config.grpo.batch_size = 2
    config.grpo.num_generations = 2
    config.rollout.max_new_tokens = 8
    config.eval.before_training = False
    config.eval.max_examples = 2
    config.eval.batch_size = 2
    return config


SFT_STEPS = 120
DEMO_QUESTION = "What are the assembly steps for the Aurora X-90 desk lamp?"


def _widths_page(html_path, out_path):
    """A copy of the page whose script, once every image has loaded, writes each image's natural width into the
    body (read back with --dump-dom)."""
    with open(html_path, encoding="utf-8") as f:
        page = f.read()
    script = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-widths', "
              "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1).join(',')); });</script>")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", script + "</body>"))


@pytest.mark.slow
def test_answer_command_writes_pages_a_browser_shows(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is required (apt-get install -y chromium; .ci/run installs it)"
    from m2io_jax import generator, train, train_generator

    workdir = str(tmp_path / "run")
    train.train(_shrink_inserter(cli.load_config(os.path.join(CONFIGS, "tiny.py"))), workdir)
    gen_config = cli.load_config(os.path.join(CONFIGS, "demo_generator.py"))
    gen_config.data.datasets = (DATASET,)
    gen_config.modes = (generator.TEXT,)
    gen_config.sft.num_steps = 4
    gen_config.sft.optimizer.warmup_steps = 0
    gen_config.eval.max_examples = 2
    train_generator.train_generators(gen_config, workdir)

    out, page = str(tmp_path / "pages" / "answer.md"), str(tmp_path / "pages" / "answer.html")
    done = _run_answer(f"--config={os.path.join(CONFIGS, 'tiny.py')}", f"--config.data.datasets=('{DATASET}',)",
                       f"--workdir={workdir}", f"--question={DEMO_QUESTION}", f"--out={out}", f"--html={page}")
    assert done.returncode == 0, done.stderr
    assert re.search(r"retrieve [\d.]+ s, generate [\d.]+ s, insert [\d.]+ s", done.stdout), done.stdout

    config = cli.load_config(os.path.join(CONFIGS, "tiny.py"))  # as the command reads it: systems defaults
    config.data.datasets = (DATASET,)
    (dataset,) = sources.load_datasets(config.data, image_dir=os.path.join(workdir, "images"))
    question = mramg.Question(id="q1", question=DEMO_QUESTION, provenance=(), ground_truth="", images=(),
                              dataset=DATASET)
    (chosen,) = systems.build_system("m2io", config, workdir, dataset=dataset).answer([question])
    assert chosen.images, f"the tiny inserter placed no image: {chosen.text!r}"
    with open(out, encoding="utf-8") as f:
        markdown = f.read()
    linked = [os.path.basename(path) for path in re.findall(r"!\[.*?\]\((.*?)\)", markdown)]
    assert linked == [os.path.basename(dataset.images[name].path) for name in chosen.images]
    with open(page, encoding="utf-8") as f:
        assert re.findall(r'data-image="([^"]+)"', f.read()) == chosen.images
    assert render.shown_images(render.RenderedAnswer(DEMO_QUESTION, chosen.text, chosen.image_map),
                               dataset.images) == chosen.images

    probe = str(tmp_path / "pages" / "widths.html")
    _widths_page(page, probe)
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", f"file://{probe}"], capture_output=True, text=True, timeout=300)
    widths = re.search(r'data-widths="([^"]*)"', dom.stdout)
    assert widths, dom.stderr[-2000:]
    assert [int(w) for w in widths.group(1).split(",")] == [96] * len(chosen.images)  # the demo's 96x96 images
    screenshot = str(tmp_path / "pages" / "answer.png")
    subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=900,1400", f"file://{page}"],
                   capture_output=True, timeout=300, check=True)
    assert os.path.getsize(screenshot) > 0
    print(f"screenshot of the answer page: {screenshot}")
    with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
        assert "grpo" in json.load(f)
