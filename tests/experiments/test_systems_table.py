"""`python -m m2io_jax.experiments.systems`: the rows it builds from evaluate's results, the demo generators'
trained settings, the inline run's shared generators, its one-line errors and (slow) the whole command on a
few-step anchors run, a few-step inline run and few-step generators."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from m2io_jax import cli, evaluate, generator, systems
from m2io_jax.eval import metrics
from m2io_jax.experiments import systems as table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
DATASET = "demo_manual"


def _run_config() -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict()
    run.systems = systems.get_systems_config()
    return run


def _write_generator_config(workdir, section: dict) -> None:
    with open(os.path.join(workdir, systems.GENERATOR_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"generator": section, "seed": 0}, f)


def test_demo_generators_are_served_with_their_trained_settings(tmp_path):
    trained = cli.load_config(os.path.join(CONFIGS, "demo_generator.py")).generator.to_dict()
    _write_generator_config(tmp_path, trained)
    run = _run_config()
    changed = systems.trained_generator_settings(run, str(tmp_path))
    assert changed["max_prompt_tokens"] == (1024, 512) and changed["max_new_tokens"] == (128, 96)
    assert "top_k" not in changed  # 3 in both
    section = run.systems.generator
    assert (section.max_prompt_tokens, section.max_new_tokens, section.batch_size) == (512, 96, 16)
    assert list(section.buckets.prompt_lengths) == [256, 512]
    assert section.checkpoint == "" and section.llm_checkpoint == ""
    assert systems.trained_generator_settings(run, str(tmp_path)) == {}  # now equal


def test_configured_generator_checkpoints_keep_the_run_settings(tmp_path):
    _write_generator_config(tmp_path, {"max_new_tokens": 7})
    run = _run_config()
    run.systems.generator.checkpoint = "/data/Qwen2.5-3B-Instruct"
    assert systems.trained_generator_settings(run, str(tmp_path)) == {}
    assert run.systems.generator.max_new_tokens == 128


@pytest.mark.parametrize("content, message", [
    ({"seed": 0}, "no \"generator\" section"),
    ({"generator": {"max_new_tokens": 96, "beam_width": 4}}, r"generator fields \['beam_width'\] are not in"),
])
def test_unexpected_generator_config_is_a_user_error(tmp_path, content, message):
    (tmp_path / systems.GENERATOR_CONFIG).write_text(json.dumps(content))
    with pytest.raises(cli.UserError, match=message):
        systems.trained_generator_settings(_run_config(), str(tmp_path))


def test_inline_run_shares_the_anchors_runs_generators(tmp_path):
    for directory in generator.CHECKPOINT_DIRS.values():
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "config.json").write_text("{}")
    anchors, inline = _run_config(), _run_config()
    anchors.systems.generator.max_new_tokens = 96
    table.share_generators(inline, anchors, str(tmp_path))
    shared = inline.systems.generator
    assert shared.checkpoint == str(tmp_path / "generator")
    assert shared.llm_checkpoint == str(tmp_path / "generator_llm")
    assert shared.max_new_tokens == 96
    assert anchors.systems.generator.checkpoint == ""  # the anchors run still finds its own


def _outcome(datasets: dict[str, float], *, oracle: bool) -> evaluate.SystemRun:
    """A SystemRun whose F1 per dataset is `datasets`' value, costs and oracle rows pooled as evaluate pools them."""
    scores = {name: [metrics.QuestionScores(f1, f1, f1, f1, 0.5, 0.25)] for name, f1 in datasets.items()}
    costs = {name: {"questions": 1.0, "latency_p50": 0.1, "latency_p95": 0.2, "seconds/insert": 0.05,
                    "tokens/generate": 30.0, "tokens/insert": 12.0} for name in datasets}
    costs[metrics.AVERAGE_ROW] = dict(costs[next(iter(datasets))], questions=float(len(datasets)), latency_p95=0.3)
    placements = {name: {"placement_accuracy": 0.5} for name in datasets} | {"all": {"placement_accuracy": 0.75}}
    return evaluate.SystemRun(metrics.aggregate(scores), [], costs if len(datasets) > 1 else
                              {name: costs[name] for name in datasets}, placements if oracle else {}, {}, "x.jsonl")


def test_system_row_takes_the_average_over_datasets():
    row = table.system_row(_outcome({"demo_web": 0.2, "demo_manual": 0.6}, oracle=True))
    assert row["F1"] == pytest.approx(40.0) and row["R.L."] == pytest.approx(50.0)
    assert row["B.S."] == pytest.approx(25.0)
    assert row[table.PLACEMENT] == 0.75 and row[table.P95] == 0.3 and row["questions"] == 2.0
    assert (row[table.GENERATE_TOKENS], row[table.INSERT_TOKENS], row[table.INSERT_SECONDS]) == (30.0, 12.0, 0.05)
    single = table.system_row(_outcome({"demo_web": 0.2}, oracle=False))
    assert single["F1"] == pytest.approx(20.0) and single[table.PLACEMENT] is None and single[table.P95] == 0.2


def test_ftii_rows_pool_hits_over_datasets():
    def ftii(accuracy, slots, placed):
        return {"accuracy": accuracy, "precision": accuracy * slots / placed if placed else math.nan,
                "slots": slots, "placed": placed}

    results = {
        "m2io": {"demo_recipe": {"inserter": ftii(0.5, 4.0, 2.0), "rule": ftii(0.25, 4.0, 4.0)},
                 "demo_manual": {"inserter": ftii(0.25, 8.0, 4.0), "rule": ftii(0.5, 8.0, 8.0)}},
        "m2io-sft": {"demo_recipe": {"inserter": ftii(0.0, 4.0, 1.0), "rule": ftii(0.25, 4.0, 4.0)},
                     "demo_manual": {"inserter": ftii(0.0, 8.0, 0.0), "rule": ftii(0.5, 8.0, 8.0)}},
    }
    rows = table.ftii_rows(results)
    assert list(rows)[:3] == ["demo_recipe m2io", "demo_recipe m2io-sft", "demo_recipe rule"]
    assert rows["all m2io"]["accuracy"] == pytest.approx(4 / 12) and rows["all m2io"]["precision"] == 4 / 6
    assert rows["all rule"]["accuracy"] == pytest.approx(5 / 12) and rows["all rule"]["placed"] == 12
    assert rows["all m2io-sft"]["accuracy"] == 0 and rows["all m2io-sft"]["precision"] == 0
    assert math.isnan(table.ftii_rows({"m2io": {"d": {"inserter": ftii(0.0, 0.0, 1.0),
                                                      "rule": ftii(0.0, 0.0, 1.0)}}})["all m2io"]["accuracy"])


def _command(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "m2io_jax.experiments.systems", *args], capture_output=True,
                          text=True, check=False, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_a_workdir_without_a_run_is_one_error_line(tmp_path):
    done = _command(f"--workdir={tmp_path}", timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("systems: error: ") and "no run config" in done.stderr


@pytest.mark.slow
def test_command_prints_every_system_format_and_ftii_row(tmp_path):
    """A few-step tiny anchors run with few-step demo generators, a few-step inline run, then the command: every
    system, metric and table is printed, and the last line's JSON holds them."""
    from m2io_jax import train, train_generator
    from tests.test_train import _shrink

    anchors, inline = str(tmp_path / "anchors"), str(tmp_path / "inline")
    for workdir, output_format in ((anchors, "anchors"), (inline, "inline")):
        config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
        config.inserter.output_format = output_format
        train.train(config, workdir)
    gen_config = cli.load_config(os.path.join(CONFIGS, "demo_generator.py"))
    gen_config.data.datasets = (DATASET,)
    gen_config.sft.num_steps = 3
    gen_config.sft.optimizer.warmup_steps = 0
    gen_config.generator.max_new_tokens = 16
    gen_config.eval.max_examples = 1
    train_generator.train_generators(gen_config, anchors)

    done = _command(f"--workdir={anchors}", f"--inline_workdir={inline}")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    printed = "\n".join(lines[:-1])
    header = next(line for line in lines if line.startswith("system "))
    for column in table.SYSTEM_COLUMNS:
        assert column in header, column
    assert list(figures["systems"]) == list(systems.SYSTEM_NAMES)
    for name, row in figures["systems"].items():
        assert any(line.split()[0] == name for line in lines), name
        for column in (*metrics.COLUMNS, table.P50, table.P95):
            assert row[column] is not None and row[column] >= 0, (name, column)
    rows = figures["systems"]
    assert rows["oracle-text"]["R.L."] == pytest.approx(100.0)  # the gold text, markers stripped
    assert rows["oracle-text"][table.PLACEMENT] is not None
    assert all(rows[name][table.PLACEMENT] is None for name in ("m2io", "m2io-sft", "rule", "llm"))
    assert rows["oracle-text"][table.GENERATE_TOKENS] == 0 and rows["m2io"][table.GENERATE_TOKENS] > 0
    assert rows["rule"][table.INSERT_TOKENS] == rows["llm"][table.INSERT_TOKENS] == 0
    assert rows["m2io"][table.INSERT_TOKENS] > 0

    formats = figures["formats"]
    assert list(formats) == ["m2io anchors", "m2io inline", "oracle-text anchors", "oracle-text inline"]
    assert formats["m2io inline"][table.GENERATE_TOKENS] == rows["m2io"][table.GENERATE_TOKENS]  # same generator
    assert formats["m2io inline"][table.INSERT_TOKENS] > 0 and "oracle-text inline" in printed

    ftii = figures["ftii"]
    for who in ("m2io", "m2io-sft", "rule"):
        assert ftii[f"{DATASET} {who}"]["slots"] == ftii[f"all {who}"]["slots"] > 0
        assert f"all {who}" in printed
    assert figures["bertscore"] is True and "wall time" in printed
