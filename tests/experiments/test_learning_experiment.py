"""`python -m m2io_jax.experiments.learning`: the larger demo corpus it generates, its arms' bookkeeping (continued
SFT's batch, diagnostics, spread, verdict, tables), its one-line errors and (slow) the whole command at one seed
and a few steps."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from m2io_jax import cli
from m2io_jax.data import mramg
from m2io_jax.data.demo import DEMO_DATASETS, build
from m2io_jax.experiments import learning

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "learning.py")


def test_scaled_demo_corpus_is_larger_valid_and_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build.generate(a, scale=2)
    build.generate(b, scale=2)
    total = 0
    for name in DEMO_DATASETS:
        with open(os.path.join(a, f"{name}_mqa.jsonl"), "rb") as fa, open(os.path.join(b, f"{name}_mqa.jsonl"),
                                                                            "rb") as fb:
            assert fa.read() == fb.read()
        ds = mramg.load_dataset(a, name, strict=True)
        assert len({q.id for q in ds.questions}) == len(ds.questions)
        total += len(ds.questions)
    assert total == 2 * 262
    with pytest.raises(ValueError, match="scale=4: expected 1..3"):
        build.generate(str(tmp_path / "c"), scale=4)


def test_scaled_manuals_get_new_model_codes(tmp_path):
    build.generate(str(tmp_path), scale=2)
    ds = mramg.load_dataset(str(tmp_path), "demo_manual", strict=True)
    assert len(ds.documents) == 24
    openings = [d.content.split(".")[0] for d in ds.documents.values()]  # "Thank you for choosing the {title}"
    assert len(set(openings)) == 24


class _Example:
    def __init__(self, prompt: int, target: int):
        self.prompt_ids, self.target_ids = [0] * prompt, [0] * target


def test_continued_sft_batch_matches_grpo_tokens_seen():
    config = ml_collections.ConfigDict({"grpo": {"batch_size": 8, "num_generations": 8}})
    settings = ml_collections.ConfigDict({"continued_sft_batch_size": 0})
    examples = [_Example(400, 30)] * 100
    size = learning.continued_batch_size(config, settings, examples)
    assert size == math.ceil(8 * (400 + 8 * 30) / 430) == 12
    assert size * 430 >= 8 * (400 + 8 * 30) > (size - 1) * 430
    settings.continued_sft_batch_size = 5
    assert learning.continued_batch_size(config, settings, examples) == 5
    settings.continued_sft_batch_size = 0
    assert learning.continued_batch_size(config, settings, examples[:7]) == 7  # at most the examples there are


def test_diagnostics_average_the_first_and_last_tenth():
    records = [{"reward/mean": float(i), "kl": 0.1 * i} for i in range(20)]
    out = learning.diagnostics(records)
    assert out["reward/mean"] == {"start": 0.5, "end": 18.5}
    assert out["kl"]["start"] == pytest.approx(0.05) and out["kl"]["end"] == pytest.approx(1.85)
    assert "entropy" not in out
    assert learning.diagnostics(records[:3])["reward/mean"] == {"start": 0.0, "end": 2.0}


def test_spread_and_verdict():
    assert learning.spread([0.5]) == (0.5, 0.0)
    mean, sd = learning.spread([0.2, 0.4, math.nan])
    assert mean == pytest.approx(0.3) and sd == pytest.approx(0.1414, abs=1e-4)
    assert all(math.isnan(v) for v in learning.spread([]))
    summary = {"grpo": {"image_f1": (0.60, 0.02), "placement_accuracy": (0.50, 0.05)},
               "sft_continued": {"image_f1": (0.50, 0.03), "placement_accuracy": (0.48, 0.01)}}
    out = learning.verdict(summary)
    assert out["image_f1"]["grpo_wins"] and not out["placement_accuracy"]["grpo_wins"]
    assert not out["grpo_beats_continued_sft"]
    assert learning.verdict({"grpo": summary["grpo"]}) == {}


def _arm(f1: float, *, step: int | None = 50, diagnostics: bool = False) -> dict:
    test = {metric: f1 for metric in learning.COLUMNS.values()}
    test["seconds_per_answer"] = 0.01
    arm = {"test": test}
    if step is not None:
        arm.update(best_step=step, tokens={"prompt": 1000, "completion": 200, "steps": 10})
    if diagnostics:
        arm["diagnostics"] = {name: {"start": 0.1, "end": 0.2} for name in learning.DIAGNOSTICS}
        arm["sft_validation"] = {"reward": 0.3}
    return arm


def test_report_has_every_arm_metric_and_the_verdict():
    per_seed = {}
    for seed in range(2):
        per_seed[seed] = {"sft": _arm(0.4), "sft_continued": _arm(0.45 + 0.01 * seed),
                          "grpo": _arm(0.5 + 0.01 * seed, diagnostics=True), "sft_no_captions": _arm(0.2),
                          "grpo_no_captions": _arm(0.25, diagnostics=True)}
    per_seed[0].update(sft_inline=_arm(0.3), grpo_inline=_arm(0.35, diagnostics=True))
    rule = {"test": {**_arm(0.6, step=None)["test"], "decode_tokens": 0.0}, "threshold": 0.5}
    text, payload = learning.report(per_seed, rule, {"train": 500, "validation": 80, "test": 120}, 60.0)
    for arm in learning.ARMS:
        assert f"| {arm} |" in text
    for column in [*learning.COLUMNS, *learning.FORMAT_COLUMNS, *learning.DIAGNOSTICS]:
        assert column in text
    for arm in ("grpo", "grpo_no_captions", "grpo_inline"):
        assert f"| {arm} | 0.300 |" in text
    assert "0.100 → 0.200" in text
    assert "| grpo_inline |" in text and "10.00 ± 0.00 ms" in text
    assert payload["verdict"]["grpo_beats_continued_sft"] is True
    assert payload["summary"]["grpo"]["image_f1"][0] == pytest.approx(0.505)
    assert payload["summary"]["rule"]["seeds"][0] == 2
    assert payload["formats"]["grpo_inline"]["seeds"][0] == 1
    assert payload["formats"]["grpo"]["seeds"][0] == 1  # anchors on the inline arms' seeds only
    assert payload["formats"]["grpo"]["image_f1"][0] == pytest.approx(0.5)
    assert "verdict: GRPO beats continued SFT" in text
    json.dumps(payload)


def test_too_small_a_test_split_stops_before_training(tmp_path):
    config = cli.load_config(CONFIG)
    config.learning.corpus_scale = 1
    config.compilation_cache_dir = ""
    with pytest.raises(cli.UserError, match=r"test split has \d+ questions, fewer than "
                                            r"learning.min_test_questions=100"):
        learning.run_experiment(config, str(tmp_path), 1)
    assert not os.path.exists(tmp_path / "anchors")


def test_the_default_corpus_gives_over_100_test_questions(tmp_path):
    config = cli.load_config(CONFIG)
    data = learning.experiment_data(config, config.learning, str(tmp_path))
    from m2io_jax.inserter import sources

    datasets = sources.load_datasets(data.data, image_dir=str(tmp_path / "images"))
    counts = {split: sum(len(ds.questions_of(split)) for ds in datasets) for split in learning.SPLITS}
    assert counts["test"] >= 100 and counts["validation"] >= 60 and counts["train"] >= 500
    assert data.data.data_dir.startswith(str(tmp_path))


@pytest.mark.slow
def test_command_at_one_seed_prints_every_arm_and_metric(tmp_path):
    out = tmp_path / "learning"
    command = [sys.executable, "-m", "m2io_jax.experiments.learning", f"--config={CONFIG}", "--seeds=1",
               f"--out={out}", "--config.learning.corpus_scale=1", "--config.learning.min_test_questions=30",
               "--config.sft.num_steps=4", "--config.grpo.num_steps=2", "--config.learning.eval_every=2",
               "--config.sft.optimizer.warmup_steps=1", "--config.optimizer.warmup_steps=1",
               "--config.compilation_cache_dir="]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    payload = json.loads(lines[-1])
    for arm in learning.ARMS:
        assert arm in payload["summary"]
        assert set(learning.COLUMNS.values()) <= set(payload["summary"][arm])
    assert set(payload["formats"]) == set(learning.FORMAT_ARMS)
    assert "verdict:" in done.stdout and "image_f1: grpo - sft_continued" in done.stdout
    table = (out / "table.md").read_text()
    for arm in learning.ARMS:
        assert f"| {arm} |" in table
    results = json.loads((out / "results.json").read_text())
    arms = results["per_seed"]["0"]
    assert arms["grpo"]["tokens"]["steps"] == 2 and arms["sft_continued"]["tokens"]["steps"] == 2
    assert arms["sft"]["best_step"] in (2, 4)
    assert "kl" in arms["grpo"]["diagnostics"]  # configs/learning.py: beta > 0
    # a second run finds every (variant, seed) done and only reports; --variants keeps the arms asked for
    again = subprocess.run([*command, "--variants=anchors"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])["summary"]
    assert set(summary) == {"rule", "sft", "sft_continued", "grpo"}
    assert all(summary[arm] == payload["summary"][arm] for arm in summary)


def test_unknown_variant_is_refused(tmp_path):
    config = cli.load_config(CONFIG)
    with pytest.raises(ValueError, match=r"variants \['bogus'\]: expected some of"):
        learning.run_experiment(config, str(tmp_path), 1, variants=("anchors", "bogus"))
