"""python -m m2io_jax.train: a few steps of each stage with configs/tiny.py (shrunk) write every workdir file;
configs/inserter_3b.py runs two steps from TFDS builds on 8 devices with its checkpoint pointed at a tiny local
one (slow: 40 s); user mistakes end in one stderr line."""

import json
import os
import subprocess
import sys

import pytest

from m2io_jax import cli, models, train
from m2io_jax.data import tfds_builder
from m2io_jax.inserter import evaluation, pipeline, sources
from m2io_jax.models import tiny
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DATASET = "demo_manual"
TIME_SPLIT = ("time/data", "time/rollout", "time/reward", "time/logprobs", "time/update")


def _shrink(config):
    """A few tiny steps of each stage on one demo dataset, on one device."""
    config.data.datasets = (DATASET,)
    config.data.retrieval.top_k = 2
    config.data.candidates.max_images = 3
    config.sft.num_steps = config.grpo.num_steps = 2  # the optimizers' total_steps follow
    config.sft.optimizer.warmup_steps = config.optimizer.warmup_steps = 0
    config.sft.batch_size = config.grpo.batch_size = 2
    config.grpo.num_generations = 2
    config.rollout.max_new_tokens = 8
    config.eval.max_examples = 2
    config.eval.batch_size = 2
    config.eval.max_new_tokens = 8
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tiny_config_writes_every_workdir_file(tmp_path, capsys):
    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    workdir = str(tmp_path / "run")
    results = train.train(config, workdir, ["train"])

    assert json.load(open(os.path.join(workdir, "config.json")))["sft"]["num_steps"] == 2
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["packages"]["jax"] and run["argv"] == ["train"] and "git_commit" in run
    counts = json.load(open(os.path.join(workdir, "data.json")))
    assert counts["train"][DATASET]["questions"] == 48 and counts["validation"][DATASET]["questions"] == 12

    records = _records(workdir)
    assert [(r["stage"], r["step"]) for r in records] == [("sft", 1), ("sft", 2), ("grpo", 1), ("grpo", 2)]
    assert all("loss" in r and "time/data" in r for r in records)
    for record in records[2:]:
        assert all(name in record for name in TIME_SPLIT + ("reward/mean", "reward/format", "groups_all_tied",
                                                           "count/parse_failed"))

    assert json.load(open(os.path.join(workdir, "eval.json"))) == results
    assert list(results) == ["rule", "init", "sft", "grpo"]
    assert results["rule"]["threshold"] in evaluation.RULE_THRESHOLDS
    assert list(results["rule"]) == [*evaluation.METRICS, "threshold"]
    assert all(list(results[stage]) == list(evaluation.METRICS) for stage in ("init", "sft", "grpo"))
    for stage in ("sft", "final"):
        path = os.path.join(workdir, stage)
        model = models.from_pretrained(path)
        Qwen2_5_VLProcessor.from_pretrained(path, config=model.config)
    assert "ETA" in capsys.readouterr().out


@pytest.mark.slow
def test_inserter_3b_config_runs_from_tfds_builds(tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    for kind in tfds_builder.KINDS:
        tfds_builder.prepare(f"{DATASET}_{kind}", data_dir=tfds_dir)
    probe = cli.load_config(os.path.join(CONFIGS, "tiny.py"))
    probe.data.datasets = (DATASET,)
    datasets = sources.load_datasets(probe.data, image_dir=str(tmp_path / "images"))
    checkpoint = tiny.build_tiny_checkpoint(
        tmp_path / "tiny", pipeline.tokenizer_texts(datasets, probe.inserter, max_images=3), kind="qwen2_5_vl")

    config = _shrink(cli.load_config(os.path.join(CONFIGS, "inserter_3b.py") + f":{checkpoint}"))
    assert config.data.source == "tfds" and config.model.checkpoint == checkpoint
    config.data.tfds_dir = tfds_dir
    config.model.processor.max_pixels = 112 * 112  # the tiny model's pixel budget, not the 3B one's
    config.sft.num_steps = config.grpo.num_steps = 1
    config.eval.before_training = False
    workdir = str(tmp_path / "run")
    results = train.train(config, workdir)

    assert [(r["stage"], r["step"]) for r in _records(workdir)] == [("sft", 1), ("grpo", 1)]
    assert list(results) == ["rule", "sft", "grpo"]  # the rule baseline needs no training
    assert not os.path.exists(os.path.join(workdir, "init"))  # the configured checkpoint, not a tiny build
    assert sorted(os.listdir(os.path.join(workdir, "images", DATASET)))  # TFDS images written as files


@pytest.mark.parametrize("args, message, code", [
    ([], "missing required flags: --workdir", 2),
    (["--workdir=WORKDIR", "--config.sft.num_step=1"], "closest valid keys: sft.num_steps", 2),
    (["--workdir=WORKDIR", "--config.model.checkpoint=/nonexistent"], "no config.json there", 1),
])
def test_user_mistakes_are_one_line(tmp_path, args, message, code):
    args = [a.replace("WORKDIR", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "m2io_jax.train", f"--config={CONFIGS}/tiny.py", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines()[-1].startswith("train: error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr
