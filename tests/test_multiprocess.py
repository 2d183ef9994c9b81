"""Two processes with jax.distributed (4 fake CPU devices each, loopback coordinator) run `python -m
m2io_jax.train` on one (data 2, fsdp 4) mesh: SFT and GRPO steps, a checkpoint, SIGKILL of both, a resume; the
final parameters and the logged losses and rewards equal those of one process with 8 devices (slow: about 8
minutes). Both start from a model given 80 SFT steps first (one process), so that some sampled completions
score and the GRPO updates move the parameters; the compared runs themselves are short, since float32 rounding
differences between the two layouts' all-reduces grow over many steps at a high learning rate."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from m2io_jax.rl import checkpoint
from tests.test_checkpoint import SETTINGS, _host
from tests.test_train import CONFIGS, ROOT

STEPS = {"sft": 2, "grpo": 4}
KILL_AFTER = STEPS["sft"] + 2  # the run step (GRPO step 2) whose checkpoint is written before the kill
WARM_UP_STEPS = 80  # SFT steps of the starting model

CONFIG = f'''
import runpy


def get_config(start=""):
    c = runpy.run_path({os.path.join(CONFIGS, "tiny.py")!r})["get_config"]()
    c.model.checkpoint = start
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    c.data.datasets = ("demo_manual",)
    c.data.retrieval.top_k = 2
    c.data.candidates.max_images = 3
    c.sft.num_steps, c.grpo.num_steps = {STEPS["sft"]}, {STEPS["grpo"]}
    c.sft.optimizer.warmup_steps = c.optimizer.warmup_steps = 0
    c.sft.batch_size = c.grpo.batch_size = 2
    c.grpo.num_generations = 8
    c.rollout.max_new_tokens = 32
    c.eval.max_examples = c.eval.batch_size = 2
    c.eval.max_new_tokens = 8
    c.eval.before_training = c.eval.rule_baseline = False
    c.checkpoint.every_steps = 2
    return c
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _command(config: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "m2io_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def _start_pair(config: str, workdir: str, logs: str, attempt: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for process_id in range(2):
        distributed = [f"--config.distributed.coordinator_address=localhost:{port}",
                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}"]
        out = open(os.path.join(logs, f"{attempt}_{process_id}.log"), "w")
        procs.append(subprocess.Popen(_command(config, workdir, *distributed), cwd=ROOT, env=_env(4), stdout=out,
                                      stderr=subprocess.STDOUT))
    return procs


def _log_tails(logs: str) -> str:
    return "\n".join(f"--- {name}\n{open(os.path.join(logs, name)).read()[-1500:]}"
                     for name in sorted(os.listdir(logs)))


def _params(workdir: str, step: int | None = None, like: object = None) -> tuple[int, object]:
    """A saved step (default: the latest) and its parameter tree; a checkpoint saved on another topology (the
    two processes' devices) is restored onto this process's first device in the structure of the tree `like`."""
    ckpts = checkpoint.RunCheckpoints(workdir, SETTINGS)
    step = ckpts.latest_step() if step is None else step
    target = None
    if like is not None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    restored = ckpts.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return step, restored.params


def _rewards(workdir: str) -> list[tuple[str, int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [(r["stage"], r["step"], r.get("reward/mean", r.get("loss"))) for r in records]


@pytest.mark.slow
def test_two_processes_resume_after_sigkill_and_match_one_process(tmp_path):
    config = str(tmp_path / "config.py")
    with open(config, "w", encoding="utf-8") as f:
        f.write(CONFIG)
    logs = str(tmp_path / "logs")
    os.makedirs(logs)

    warm = str(tmp_path / "warm")
    done = subprocess.run(_command(config, warm, f"--config.sft.num_steps={WARM_UP_STEPS}", "--config.grpo.num_steps=0",
                                   "--config.sft.optimizer.learning_rate=1e-2"),
                          cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    config += ":" + os.path.join(warm, "final")

    multi = str(tmp_path / "multi")
    procs = _start_pair(config, multi, logs, "first")
    ckpt_dir = os.path.join(multi, "checkpoints")
    deadline = time.time() + 900
    while not (os.path.isdir(ckpt_dir) and str(KILL_AFTER) in os.listdir(ckpt_dir)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), _log_tails(logs)
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(os.path.join(multi, "final"))
    kept = checkpoint.RunCheckpoints(multi, SETTINGS).latest_step()
    assert kept is not None and KILL_AFTER <= kept < sum(STEPS.values())

    procs = _start_pair(config, multi, logs, "resume")
    for p in procs:
        assert p.wait(timeout=900) == 0, _log_tails(logs)
    assert "resuming from" in open(os.path.join(logs, "resume_0.log")).read()
    assert "resuming from" not in open(os.path.join(logs, "resume_1.log")).read()  # process 0 alone prints

    single = str(tmp_path / "single")
    done = subprocess.run(_command(config, single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    step_one, tree_one = _params(single)
    step_two, tree_two = _params(multi, like=tree_one)
    params_one, params_two = _host(tree_one), _host(tree_two)
    assert step_one == step_two == sum(STEPS.values())
    # Relative L2 error over all parameters <= 1e-6. The processes' all-reduces (gloo) sum in another order than
    # one process's, so gradients differ by float32 rounding; Adam divides by the gradient's running scale, so
    # an element whose gradient is near zero can move by a few 1e-6 more or less (seen: 4e-6 in 1 of 4096).
    error = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(params_one, params_two)))
    assert error <= 1e-6 * np.sqrt(sum(float(np.sum(a ** 2)) for a in params_one))
    for a, b in zip(params_one, params_two):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)
    after_sft = _host(_params(single, STEPS["sft"])[1])
    assert any(not np.array_equal(a, b) for a, b in zip(params_one, after_sft))  # GRPO moved them: not trivial
    for one, two in zip(_rewards(single), _rewards(multi), strict=True):
        assert one[:2] == two[:2] and abs(one[2] - two[2]) <= 1e-5 * max(1.0, abs(one[2]))
    assert os.path.isfile(os.path.join(multi, "final", "config.json"))
