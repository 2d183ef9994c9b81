"""Run checkpoints (`m2io_jax.rl.checkpoint`): trainer state round trips, another mesh, config and shape checks,
and resume of `m2io_jax.train` (exact, after SIGTERM, after SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from m2io_jax import cli, sharding, train
from m2io_jax.rl import checkpoint
from m2io_jax.rl.trainer import PromptBatch, Trainer
from tests.rl.trainer_helpers import PROMPTS, STOP, fraction_reward, tiny_text_model, trainer_config
from tests.test_train import CONFIGS, ROOT, _records, _shrink

SETTINGS = ml_collections.ConfigDict({"every_steps": 1, "keep": 2, "asynchronous": True})


def _trainer(mesh=None, seed=0, **shape):
    return Trainer(tiny_text_model(seed, **shape), trainer_config(learning_rate=1e-3, beta=0.04),
                   reward_fn=fraction_reward(), stop_tokens=[STOP], mesh=mesh)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _save(ckpts, trainer, step, stage="grpo"):
    ckpts.save(checkpoint.Position(stage, step, 0), trainer.state(), seed=0, data_state={"next_index": step},
               config={"seed": 0})


def test_state_restores_onto_another_mesh(tmp_path):
    saving = _trainer(sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))
    saving.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=0)
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), SETTINGS)
    _save(ckpts, saving, 1)
    ckpts.close()

    target = _trainer(sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}), seed=1)
    before = _host(target.state())
    restored = checkpoint.RunCheckpoints(str(tmp_path), SETTINGS).restore(1, target.state())
    target.restore(restored)
    state = target.state()
    assert set(state) == {"params", "opt_state", "reference"}
    for a, b in zip(_host(saving.state()), _host(state)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before, _host(state)))  # seed 1 differed before
    for restored_leaf, target_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(_trainer(target._mesh).state())):
        assert restored_leaf.sharding == target_leaf.sharding  # laid out on the new mesh


def test_keep_and_meta_and_params_alone(tmp_path):
    trainer = _trainer()
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), SETTINGS)
    for step in (1, 2, 3):
        _save(ckpts, trainer, step)
    _save(ckpts, trainer, 3)  # the same step again: kept as it is
    ckpts.close()
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), SETTINGS)
    assert ckpts.steps() == [2, 3]
    saved = ckpts.saved()
    assert saved.position == checkpoint.Position("grpo", 3, 0) and saved.data_state == {"next_index": 3}
    params = ckpts.restore_params(2, trainer.state()["params"])
    for a, b in zip(_host(trainer.state()["params"]), _host(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(cli.UserError, match="no checkpoint of step 1; it holds steps \\[2, 3\\]"):
        ckpts.saved(1)


def test_another_model_shape_is_a_clear_error(tmp_path):
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), SETTINGS)
    _save(ckpts, _trainer(), 1)
    ckpts.close()
    wider = _trainer(intermediate_size=96)
    with pytest.raises(cli.UserError, match=r"another shape.*down_proj.*saved \[2, 64, 32\], model \[2, 96, 32\]"):
        checkpoint.RunCheckpoints(str(tmp_path), SETTINGS).restore(1, wider.state())


def test_changed_config_names_the_fields_but_allows_cadence_and_step_counts():
    saved = {"seed": 0, "log_every": 1, "grpo": {"num_steps": 10, "beta": 0.04}, "checkpoint": {"keep": 3}}
    checkpoint.check_config(saved, {"seed": 0, "log_every": 5, "grpo": {"num_steps": 20, "beta": 0.04},
                                    "checkpoint": {"keep": 1}}, "DIR")
    with pytest.raises(cli.UserError, match=r"grpo\.beta \(0\.04 -> 0\.0\), seed \(0 -> 1\)"):
        checkpoint.check_config(saved, {**saved, "seed": 1, "grpo": {"num_steps": 10, "beta": 0.0}}, "DIR")


def _config(steps, lora_rank=0):
    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    config.sft.num_steps = config.grpo.num_steps = steps
    config.eval.before_training = config.eval.rule_baseline = False
    config.checkpoint.every_steps = 1
    config.lora.rank = lora_rank
    return config


def _params(workdir, step=None):
    """A step (default: the latest) of `workdir`'s checkpoints and its parameters, restored as saved."""
    ckpts = checkpoint.RunCheckpoints(workdir, SETTINGS)
    step = ckpts.latest_step() if step is None else step
    restored = ckpts.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    return step, _host(restored.params)


def _metrics_without_time(workdir):
    timings = ("time/", "tokens_per_second", "compiled_programs", "perf/")
    return [{k: v for k, v in r.items() if not k.startswith(timings)} for r in _records(workdir)]


@pytest.mark.parametrize("lora_rank", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_after_sigterm_gives_the_uninterrupted_run(tmp_path, monkeypatch, lora_rank):
    """With LoRA the GRPO checkpoints hold the adapters alone, and the resumed stage rebuilds their base from
    the SFT stage's saved model."""
    whole = str(tmp_path / "whole")
    train.train(_config(2, lora_rank), whole)

    parts = str(tmp_path / "parts")
    grpo_step = Trainer.grpo_step

    def terminated_during_step(self, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return grpo_step(self, batch, step)

    monkeypatch.setattr(Trainer, "grpo_step", terminated_during_step)
    with pytest.raises(checkpoint.Preempted):
        train.train(_config(2, lora_rank), parts)
    monkeypatch.setattr(Trainer, "grpo_step", grpo_step)
    saved = checkpoint.RunCheckpoints(parts, SETTINGS).saved()
    assert saved.position == checkpoint.Position("grpo", 1, 2)  # the step SIGTERM arrived in, complete
    assert not os.path.exists(os.path.join(parts, "final"))

    changed = _config(2, lora_rank)
    changed.grpo.beta = 0.5
    with pytest.raises(cli.UserError, match=r"grpo\.beta"):
        train.train(changed, parts)
    results = train.train(_config(2, lora_rank), parts)

    assert _params(parts)[0] == _params(whole)[0] == 4
    for a, b in zip(_params(whole)[1], _params(parts)[1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert _metrics_without_time(parts) == _metrics_without_time(whole)
    assert list(results) == ["sft", "grpo"] and results == json.load(open(os.path.join(whole, "eval.json")))
    if lora_rank:
        saved = {k for k in checkpoint.RunCheckpoints(parts, SETTINGS).saved().param_shapes}
        assert saved and all("'lora'" in k for k in saved)  # the adapters alone
        for a, b in zip(_params(parts, step=2)[1], _params(whole, step=2)[1]):  # the SFT stage's full weights
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    overrides = ["--config.sft.num_steps=3", "--config.grpo.num_steps=3", "--config.eval.before_training=false",
                 "--config.eval.rule_baseline=false", "--config.checkpoint.every_steps=1",
                 "--config.data.datasets=('demo_manual',)", "--config.sft.batch_size=2", "--config.grpo.batch_size=2",
                 "--config.grpo.num_generations=2", "--config.rollout.max_new_tokens=8",
                 "--config.eval.max_examples=2", "--config.eval.batch_size=2", "--config.eval.max_new_tokens=8",
                 "--config.sft.optimizer.warmup_steps=0", "--config.optimizer.warmup_steps=0"]
    command = [sys.executable, "-m", "m2io_jax.train", f"--config={CONFIGS}/tiny.py", f"--workdir={workdir}",
               *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = tmp_path / "first_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.isdir(ckpt_dir) and "4" in os.listdir(ckpt_dir)):
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = checkpoint.RunCheckpoints(workdir, SETTINGS).latest_step()
    assert kept is not None and kept >= 4
    before = [r for r in _records(workdir)]

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    records = _records(workdir)
    assert [(r["stage"], r["step"]) for r in records] == [("sft", s) for s in (1, 2, 3)] + [("grpo", s)
                                                                                            for s in (1, 2, 3)]
    position = checkpoint.Position("grpo", kept - 3, 3)
    kept_records = [r for r in before if position.reached(r["stage"], r["step"])]
    assert records[:len(kept_records)] == kept_records  # nothing before the checkpoint lost or redone
    assert os.path.isfile(os.path.join(workdir, "final", "config.json"))
