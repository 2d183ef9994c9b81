"""`python -m m2io_jax.evaluate` on a tiny MRAMG-layout fixture and on the demo corpus."""

import dataclasses
import json
import subprocess
import sys

import pytest

from m2io_jax import evaluate
from m2io_jax.eval import metrics

QUESTIONS = [
    {"id": "q1", "question": "How to bake?", "provenance": [1], "images_list": ["a", "b"],
     "ground_truth": "Mix the flour. <PIC> Bake for twenty minutes. <PIC>"},
    {"id": "q2", "question": "Reset?", "provenance": [1], "images_list": ["c"],
     "ground_truth": "Hold the button. <PIC>"},
    {"id": "q3", "question": "No image?", "provenance": [1], "images_list": [],
     "ground_truth": "Just text."},
]


@pytest.fixture()
def data_dir(tmp_path):
    document = [1, "Mix. <PIC> Bake. <PIC> Hold. <PIC>", ["a", "b", "c"]]
    (tmp_path / "doc_tiny.jsonl").write_text(json.dumps(document) + "\n")
    (tmp_path / "tiny_mqa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "images_info").mkdir()
    (tmp_path / "images_info" / "tiny_imgs_collection.json").write_text(
        json.dumps({n: {"image_caption": n, "image_path": f"{n}.png"} for n in "abc"})
    )
    return tmp_path


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_scores_table(data_dir, tmp_path):
    predictions_path = _write(tmp_path / "pred.jsonl", [
        # q1: images swapped (b, a) and text identical once markers are stripped.
        {"id": "q1", "dataset": "tiny", "final_output": "Mix the flour. <img2> Bake for twenty minutes. <img1>",
         "image_map": {"img1": "a", "img2": "b"}},
        # q2: <img3> is not in the map -> a wrong image.
        {"id": "q2", "dataset": "tiny", "final_output": "Hold the button. <img3>", "image_map": {"img1": "c"}},
        {"id": "zzz", "dataset": "tiny", "final_output": "unknown question", "image_map": {}},
    ])  # q3 missing: scores 0
    table, results = evaluate.evaluate(predictions_path, str(data_dir), bertscore=False)
    (result,) = results
    assert result.missing == ["q3"] and result.unknown == ["zzz"]
    q1, q2, q3 = (result.scores[q] for q in ("q1", "q2", "q3"))
    assert (q1.precision, q1.recall, q1.f1) == (1.0, 1.0, 1.0)
    assert q1.ordering == pytest.approx(metrics.ordering_score(["a", "b"], ["b", "a"]))
    assert q1.rouge_l == pytest.approx(1.0)  # markers stripped on both sides
    assert (q2.precision, q2.recall, q2.ordering) == (0.0, 0.0, 0.0)
    assert q3 == dataclasses.replace(metrics.ZERO_SCORES, bert_score=None)
    assert table["tiny"]["Prec."] == pytest.approx(100 / 3)
    assert table["tiny"]["B.S."] is None
    raw, _ = evaluate.evaluate(predictions_path, str(data_dir), bertscore=False, strip_markers=False)
    assert raw["tiny"]["R.L."] < table["tiny"]["R.L."]


def test_cli_with_bertscore(data_dir, tmp_path):
    predictions_path = _write(tmp_path / "pred.jsonl", [
        {"id": q["id"], "dataset": "tiny", "final_output": q["ground_truth"].replace("<PIC>", ""), "image_map": {}}
        for q in QUESTIONS
    ])
    out = tmp_path / "scores.json"
    proc = subprocess.run(
        [sys.executable, "-m", "m2io_jax.evaluate", f"--predictions={predictions_path}", f"--data={data_dir}",
         f"--output={out}"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = proc.stdout.splitlines()[:2]
    assert header.split() == ["Dataset", *metrics.COLUMNS]
    assert "tiny: 3 questions, 3 answered, 0 missing" in proc.stdout
    written = json.loads(out.read_text())
    assert written["table"]["tiny"]["B.S."] == pytest.approx(100.0, abs=1e-3)  # identical texts
    assert written["table"]["tiny"]["R.L."] == pytest.approx(100.0)
    assert written["datasets"]["tiny"]["scores"]["q3"]["f1"] == 1.0  # no gold, no prediction: perfect


def test_demo_corpus_gold_answers_score_perfectly(tmp_path):
    from m2io_jax.data import demo, mramg

    root = demo.demo_root()
    name = demo.DEMO_DATASETS[0]
    questions = mramg.load_dataset(root, name, check_images=False).questions
    records = []
    for q in questions:
        markers = " ".join(f"<img{i + 1}>" for i in range(len(q.images)))
        records.append({"id": q.id, "dataset": name, "final_output": f"{q.answer} {markers}",
                        "image_map": {f"img{i + 1}": image for i, image in enumerate(q.images)}})
    table, _ = evaluate.evaluate(_write(tmp_path / "p.jsonl", records), root, bertscore=False)
    assert table[name]["F1"] == pytest.approx(100.0) and table[name]["Ord."] == pytest.approx(100.0)
    assert table[name]["R.L."] == pytest.approx(100.0)


def test_cli_reports_a_malformed_predictions_file_in_one_line(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "dataset": "tiny", "final_output": "x", "image_map": {}}\nnot json\n')
    proc = subprocess.run(
        [sys.executable, "-m", "m2io_jax.evaluate", f"--predictions={bad}", f"--data={data_dir}",
         "--config.bertscore.enabled=false", "--config.strip_image_markers=false"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"evaluate: error: {bad}:2: invalid JSON: Expecting value"]


def _answer(question_id, text, image_map, timings, tokens, batch_size):
    from m2io_jax import systems

    return systems.SystemAnswer(question_id, text, [image_map[m] for m in metrics.image_markers(text)
                                                    if m in image_map], image_map, timings, tokens, batch_size)


def test_system_costs_are_per_question_shares_of_each_batch():
    answers = [_answer(f"q{i}", "x", {}, {"retrieve": 0.2, "generate": 1.0, "insert": 0.8}, {"generate": 10 + i,
                                                                                              "insert": 4}, 2)
               for i in range(2)]
    answers.append(_answer("q2", "x", {}, {"retrieve": 0.5, "generate": 2.5, "insert": 1.0}, {"generate": 30,
                                                                                           "insert": 8}, 1))
    costs = evaluate.system_costs(answers)  # shares: 1.0, 1.0, 4.0 seconds
    assert costs["questions"] == 3 and costs["latency_p50"] == pytest.approx(1.0)
    assert costs["latency_p95"] == pytest.approx(1.0 + 0.9 * 3.0)  # numpy's linear interpolation
    assert costs["seconds/generate"] == pytest.approx((0.5 + 0.5 + 2.5) / 3)
    assert costs["tokens/generate"] == pytest.approx(51 / 3) and costs["tokens/insert"] == pytest.approx(16 / 3)
    table = evaluate.format_rows({"demo": costs}, evaluate.COST_COLUMNS)
    assert table.splitlines()[1].split()[:4] == ["demo", "3", "1", "3.700"]


def test_oracle_scores_are_the_trainers_held_out_metrics():
    """`oracle_scores` reads an answer's text as the trainer's evaluation reads the completion it came from."""
    from m2io_jax.inserter import evaluation, formats
    from tests.inserter.demo_setup import demo_setup

    setup = demo_setup()
    examples, _ = setup.examples("validation")
    completions = []
    for i, prepared in enumerate(examples):
        gold = list(prepared.example.gold_anchors or ())
        if i % 3 == 1:  # reverse order, the first image before the first sentence
            gold = [formats.Placement(p.image, -1 if k == 0 else p.sentence) for k, p in enumerate(reversed(gold))]
        body = " ".join(f"<{p.image}>@{p.sentence + 1}" for p in gold)
        if i % 3 == 2:
            body += " <img9>@1"  # not a candidate: a wrong image
        completions.append(f"{formats.ANSWER_OPEN}{body}{formats.ANSWER_CLOSE}")
    expected = evaluation.score_completions(completions, examples, setup.config.inserter)
    by_id = {q.id: q for q in setup.dataset.questions}
    answers = []
    for text, prepared in zip(completions, examples):
        example = prepared.example
        parsed = formats.parse_completion(text, output_format="anchors", think=False, answer=example.answer,
                                          candidate_ids=example.candidate_ids)
        answers.append(_answer(example.candidates.question_id, parsed.inline_text or example.answer,
                               dict(example.candidates.image_map), {}, {}, 1))
    got = evaluate.oracle_scores([by_id[a.question_id] for a in answers], answers, setup.config.inserter)
    assert 0.2 < got["image_f1"] < 0.99 and 0.2 < got["placement_accuracy"] < 0.99  # not trivially 0 or 1
    for name in evaluate.ORACLE_COLUMNS:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def _evaluate_cli(*args, timeout=900):
    import os

    return subprocess.run([sys.executable, "-m", "m2io_jax.evaluate", *args], capture_output=True, text=True,
                          check=False, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, message", [
    ([], "nothing to do: give --predictions FILE --data DIR"),
    (["--system=oracle-text"], "missing required flags: --workdir"),
    (["--system=oracle-text", "--workdir=WORKDIR"], "config.json: no run config; train a run there with python -m "
                                                    "m2io_jax.train"),
    (["--predictions=x.jsonl", "--system=m2io"], "--predictions scores a file; --system / --ftii run a system"),
])
def test_cli_mistakes_are_one_line(tmp_path, args, message):
    proc = _evaluate_cli(*(a.replace("WORKDIR", str(tmp_path)) for a in args), timeout=300)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("evaluate: error: ") and message in proc.stderr


@pytest.mark.slow
def test_oracle_text_reproduces_the_trainers_eval_json_and_ftii_runs(tmp_path):
    """A few-step tiny run, then `evaluate --system=oracle-text --split=validation` on its workdir: the inserter
    metrics equal eval.json's "grpo" entry (same checkpoint, split, prompts and greedy decode); `--ftii` prints
    the inserter's and the rule baseline's accuracy."""
    import os

    from m2io_jax import cli, train
    from tests.test_train import CONFIGS, _shrink

    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    config.eval.max_examples = 0  # the whole validation split, as evaluate runs it
    workdir = str(tmp_path / "run")
    trained = train.train(config, workdir)["grpo"]

    output = tmp_path / "oracle.json"
    proc = _evaluate_cli("--system=oracle-text", "--split=validation", f"--workdir={workdir}", f"--output={output}",
                         "--config.bertscore.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inserter on the gold text (as eval.json)" in proc.stdout and "latency_p50" in proc.stdout
    written = json.loads(output.read_text())
    (dataset,) = config.data.datasets
    oracle = written["oracle"][dataset]
    assert oracle["examples"] == trained["examples"] == 12
    for name in ("image_precision", "image_recall", "image_f1", "ordering", "placement_accuracy",
                 "placement_gold_images"):
        assert oracle[name] == pytest.approx(trained[name], abs=1e-9), name
    assert written["costs"][dataset]["tokens/insert"] > 0 and written["costs"][dataset]["tokens/generate"] == 0
    predictions = os.path.join(workdir, "eval", "oracle-text_validation.jsonl")
    assert len(open(predictions).read().splitlines()) == 12

    proc = _evaluate_cli("--ftii", "--split=test", f"--workdir={workdir}", f"--output={tmp_path / 'ftii.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ftii_rows = json.loads((tmp_path / "ftii.json").read_text())["ftii"][dataset]
    assert ftii_rows["inserter"]["slots"] == ftii_rows["rule"]["slots"] > 0
    assert f"{dataset} m2io" in proc.stdout and f"{dataset} rule" in proc.stdout


def test_run_config_comes_from_the_workdir_or_from_a_run_config_file(tmp_path):
    import os

    from m2io_jax import cli
    from m2io_jax.eval import config as eval_config
    from tests.test_train import CONFIGS

    tiny = cli.load_config(os.path.join(CONFIGS, "tiny.py"))
    tiny.data.retrieval.top_k = 5
    settings = eval_config.get_config()
    settings.bertscore.enabled = False
    with pytest.raises(Exception, match="no run config; train a run there"):
        evaluate.split_config(settings, str(tmp_path))
    (tmp_path / "config.json").write_text(tiny.to_json_best_effort())
    run, got = evaluate.split_config(settings, str(tmp_path))
    assert run.data.retrieval.top_k == 5 and got.bertscore.enabled is False
    assert run.systems.batch_size == 16  # the systems section's defaults

    tiny.judge = eval_config.get_config().judge
    tiny.judge.enabled = True
    run, got = evaluate.split_config(tiny, str(tmp_path / "elsewhere"))
    assert run.data.retrieval.top_k == 5 and got.judge.enabled is True and got.bertscore.enabled is True
    with pytest.raises(cli.UserError, match="--dataset=wit: not a dataset of the run"):
        evaluate.run_datasets(run, str(tmp_path), ["wit"])


def test_judge_rows_of_system_answers(tmp_path):
    from m2io_jax.eval import config as eval_config
    from m2io_jax.eval import judge as judge_lib
    from m2io_jax.inserter import sources
    from m2io_jax.models import tiny
    from m2io_jax.train_config import get_config

    data = get_config().data
    data.datasets = ("demo_recipe",)
    (dataset,) = sources.load_datasets(data, image_dir=str(tmp_path / "images"))
    first, second = dataset.questions_of("test")[:2]
    answers = [_answer(first.id, "Combine them.<img1> Then simmer.<img2>",
                       {"img1": first.images[0], "img2": first.images[1]}, {}, {}, 1),
               _answer(second.id, "It looks golden.", {}, {}, {}, 1)]
    texts = [q.question for q in dataset.questions] + [d.content for d in dataset.documents.values()]
    settings = eval_config.get_config().judge
    settings.max_new_tokens = 6
    judge = judge_lib.Judge.from_pretrained(tiny.build_tiny_checkpoint(tmp_path / "judge", texts, kind="qwen2",
                                                                       vocab_size=500), settings)
    row = evaluate.judge_scores(judge, dataset, [first, second], answers)
    assert (row["questions"], row["no_image"]) == (2, 1)
    requests = judge_lib.build_requests([judge_lib.judge_item(
        first.id, first.question, answers[0].text, list(first.images[:2]),
        {n: i.caption for n, i in dataset.images.items()}, judge_lib.image_contexts(dataset.documents))])
    assert len(requests) == 2 + 2 + 1 + 1  # relevance and effectiveness per image, position, overall
    assert all(value is None or 0.0 <= value <= 100.0 for value in (row[r] for r in judge_lib.RUBRICS))
    assert row["unparsable/overall"] <= 2 and row["unparsable/relevance"] <= 2
