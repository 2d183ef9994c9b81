"""launch/: the TPU VM scripts parse (bash -n), pass shellcheck, print the right gcloud commands in their dry run,
and the preemption loop (keep_training.sh) reacts to each queued-resource state and trainer status, driven by a
fake `gcloud` on PATH that records its argv and answers scripted states; worker.sh really starts and reports a
(fake) trainer."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

SETTINGS = {
    "TPU_NAME": "m2io-test", "ZONE": "us-west4-a", "PROJECT": "trc-project", "ACCELERATOR": "v5litepod-16",
    "WORKDIR": "gs://m2io-bucket/runs/inserter_3b", "DATA_GCS": "gs://m2io-bucket/data",
    "TRAIN_FLAGS": "--config.data.tfds_dir=$HOME/m2io_data/tfds --config.grpo.num_steps=20",
}
ZONE_AND_PROJECT = ["--zone=us-west4-a", "--project=trc-project"]


def launch_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "RUNTIME", "CAPACITY", "QUEUED_NAME")}
    env.update(SETTINGS)
    env.update(overrides)
    return env


def run_script(script: str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def dry_run(script: str, *args: str, **overrides: str) -> list[list[str]]:
    """The argv of every command the dry run prints ("+ cmd ..." lines)."""
    result = run_script(script, "--dry-run", *args, env=launch_env(**overrides))
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def ssh_commands(commands: list[list[str]], worker: str = "all") -> list[str]:
    """The --command of every `tpu-vm ssh` to `worker`."""
    out = []
    for argv in commands:
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and f"--worker={worker}" in argv:
            out += [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return out


# ------------------------------------------------------------------------------------------------ static checks
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"{script}: {result.stderr}"


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, ("shellcheck is not installed; it is part of this suite (apt-get install -y shellcheck; "
                        ".ci/run installs it)")
    result = subprocess.run([shellcheck, "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_has_the_scripts_the_readme_names():
    names = {p.name for p in SCRIPTS}
    assert {"install.sh", "tpu_vm.sh", "keep_training.sh", "worker.sh", "common.sh"} <= names


# ---------------------------------------------------------------------------------------------------- dry run
def test_dry_run_create_and_queue():
    (create,) = dry_run("tpu_vm.sh", "create")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "m2io-test", "--accelerator-type=v5litepod-16",
                      "--version=v2-alpha-tpuv5-lite", "--spot", *ZONE_AND_PROJECT]
    (queue,) = dry_run("tpu_vm.sh", "queue")
    assert queue == ["gcloud", "compute", "tpus", "queued-resources", "create", "m2io-test-qr", "--node-id=m2io-test",
                     "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                     *ZONE_AND_PROJECT]


@pytest.mark.parametrize("accelerator,runtime", [("v4-8", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5"),
                                                 ("v6e-8", "v2-alpha-tpuv6e")])
def test_dry_run_runtime_per_generation_and_capacity(accelerator, runtime):
    (create,) = dry_run("tpu_vm.sh", "create", ACCELERATOR=accelerator, CAPACITY="on-demand")
    assert f"--version={runtime}" in create and f"--accelerator-type={accelerator}" in create
    assert "--spot" not in create and "--preemptible" not in create
    (queue,) = dry_run("tpu_vm.sh", "queue", ACCELERATOR=accelerator, CAPACITY="preemptible", RUNTIME="custom-rt",
                       QUEUED_NAME="my-qr")
    assert queue[5] == "my-qr" and "--runtime-version=custom-rt" in queue and "--preemptible" in queue


def test_dry_run_up_and_train_run_on_every_worker():
    commands = dry_run("tpu_vm.sh", "up") + dry_run("tpu_vm.sh", "train")
    scp = [argv for argv in commands if argv[3:5] == ["tpu-vm", "scp"]]
    assert len(scp) == 1 and "--worker=all" in scp[0] and scp[0][6] == "m2io-test:m2io_jax.tar.gz"
    sync, install, data, train = ssh_commands(commands)
    assert "tar -xzf m2io_jax.tar.gz -C m2io_jax" in sync
    assert install == "cd m2io_jax && bash launch/install.sh tpu"
    assert data == "mkdir -p $HOME/m2io_data && gcloud storage rsync --recursive gs://m2io-bucket/data $HOME/m2io_data"
    assert shlex.split(train) == [
        "cd", "m2io_jax", "&&", "bash", "launch/worker.sh", "start", "--workdir=gs://m2io-bucket/runs/inserter_3b",
        "--config=configs/inserter_3b.py:$HOME/m2io_data/Qwen2.5-VL-3B-Instruct",
        "--config.data.tfds_dir=$HOME/m2io_data/tfds", "--config.grpo.num_steps=20"]
    for argv in commands:
        if argv[0] == "gcloud":
            assert argv[-2:] == ZONE_AND_PROJECT and "m2io-test" in " ".join(argv), argv


def test_dry_run_install_extras():
    (install,) = ssh_commands(dry_run("tpu_vm.sh", "install", INSTALL_EXTRAS="tpu,demo"))
    assert install == "cd m2io_jax && bash launch/install.sh tpu,demo"


def test_dry_run_logs_and_delete():
    (logs,) = dry_run("tpu_vm.sh", "logs", WORKER="2")
    assert ssh_commands([logs], worker="2") == ["tail -n +1 -F m2io_jax/logs/train.log"]
    (delete,) = dry_run("tpu_vm.sh", "delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "m2io-test"] and "--quiet" in delete
    (delete_queued,) = dry_run("tpu_vm.sh", "delete-queued")
    assert delete_queued[3:6] == ["queued-resources", "delete", "m2io-test-qr"] and "--force" in delete_queued


def test_dry_run_keep_training_prints_one_preemption_cycle():
    commands = [argv for argv in dry_run("keep_training.sh") if argv[0] == "gcloud"]
    verbs = [" ".join(argv[3:5]) for argv in commands]
    assert verbs == ["queued-resources describe", "tpu-vm ssh", "queued-resources create", "tpu-vm scp",
                     "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "queued-resources delete",
                     "queued-resources create", "tpu-vm ssh", "queued-resources delete"]
    starts = [c for c in ssh_commands(commands) if "launch/worker.sh start" in c]
    assert len(starts) == 2 and all("--workdir=gs://m2io-bucket/runs/inserter_3b" in c for c in starts)


@pytest.mark.parametrize("script,args,overrides,message", [
    ("tpu_vm.sh", ("train",), {"WORKDIR": "/tmp/local_run"}, "WORKDIR='/tmp/local_run'; expected a gs://"),
    ("keep_training.sh", (), {"WORKDIR": ""}, "WORKDIR=''; expected a gs://"),
    ("tpu_vm.sh", ("create",), {"ACCELERATOR": "v3-8"}, "no default RUNTIME for ACCELERATOR=v3-8"),
    ("tpu_vm.sh", ("queue",), {"CAPACITY": "cheap"}, "CAPACITY=cheap; expected spot, preemptible or on-demand"),
    ("tpu_vm.sh", ("create",), {"ZONE": ""}, "set ZONE"),
    ("tpu_vm.sh", ("frobnicate",), {}, "bash launch/tpu_vm.sh [--dry-run] create"),
])
def test_mistakes_are_one_clear_error(script, args, overrides, message):
    result = run_script(script, "--dry-run", *args, env=launch_env(**overrides))
    assert result.returncode != 0
    assert message in result.stderr
    assert "gcloud compute tpus" not in result.stdout


# ------------------------------------------------------------------------------------------------- worker.sh
def test_worker_starts_the_trainer_detached_and_reports_its_exit(tmp_path):
    """worker.sh in a copy of the layout it expects, with a fake .venv/bin/python that records its argv and
    exits with the status the test releases."""
    (tmp_path / "launch").mkdir()
    shutil.copy(LAUNCH / "worker.sh", tmp_path / "launch" / "worker.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > argv.txt
        echo "step 1 of 20"
        while [ ! -f release ]; do sleep 0.05; done
        exit "$(cat release)"
        """))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    worker = ["bash", str(tmp_path / "launch" / "worker.sh")]

    def status() -> str:
        return subprocess.run([*worker, "status"], capture_output=True, text=True, check=True).stdout.strip()

    assert status() == "none"
    flags = ["--workdir=gs://b/run", "--config=configs/inserter_3b.py:/data/ckpt", "--config.x=a b"]
    started = subprocess.run([*worker, "start", *flags], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 20
    while not (tmp_path / "argv.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "argv.txt").read_text().splitlines() == ["-m", "m2io_jax.train", *flags]
    assert status() == "running"
    again = subprocess.run([*worker, "start", *flags], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "already runs" in again.stderr

    (tmp_path / "release").write_text("75")
    while status() == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status() == "exit 75"
    assert "step 1 of 20" in (tmp_path / "logs" / "train.log").read_text()


# -------------------------------------------------------------------------------------------- keep_training.sh
FAKE_GCLOUD = """\
#!{python}
'''A fake gcloud: records its argv, answers `queued-resources describe` and worker 0's train-status from
scripted sequences (one answer per call; "ABSENT": the resource does not exist; "SSH_FAILS": ssh exits 255),
succeeds at everything else.'''
import json, os, sys
state = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\\n")

def answer(name):
    path = os.path.join(state, name)
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        sys.exit(f"fake gcloud: {{name}} has no more answers for {{argv}}")
    with open(path, "w") as f:
        f.write("".join(line + "\\n" for line in lines[1:]))
    return lines[0]

if argv[2:4] == ["queued-resources", "describe"]:
    reply = answer("states")
    if reply == "ABSENT":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND")
    print(reply)
elif argv[2:4] == ["tpu-vm", "ssh"] and any("worker.sh status" in a for a in argv):
    print("Using ssh batch size of 1. Attempting to SSH into 1 nodes", file=sys.stderr)
    reply = answer("statuses")
    if reply == "SSH_FAILS":
        sys.exit(255)
    print(reply)
"""


def run_keep_training(tmp_path: Path, states: list[str], statuses: list[str]) -> tuple[int, list[list[str]], str]:
    """Runs keep_training.sh against the fake gcloud; its exit status, the gcloud argvs in order, its output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "states").write_text("".join(s + "\n" for s in states))
    (tmp_path / "statuses").write_text("".join(s + "\n" for s in statuses))
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(tmp_path),
                     POLL_SECONDS="0", MAX_RECREATE="3")
    result = run_script("keep_training.sh", env=env, timeout=120)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return result.returncode, calls, result.stdout + result.stderr


def steps_of(calls: list[list[str]]) -> list[str]:
    """Each gcloud call as a short name: describe, create, delete, scp, or ssh:<what the command does>."""
    names = []
    for argv in calls:
        verb = argv[3]
        if verb != "ssh":
            names.append(verb)
            continue
        command = next(a.removeprefix("--command=") for a in argv if a.startswith("--command="))
        for key, name in (("worker.sh status", "status"), ("worker.sh start", "start"), ("install.sh", "install"),
                          ("tar -xzf", "unpack"), ("storage rsync", "data")):
            if key in command:
                names.append(f"ssh:{name}")
    return names


def test_keep_training_recreates_a_preempted_queued_resource_and_resumes(tmp_path):
    states = ["ABSENT", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE", "SUSPENDED", "DELETING",
              "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "ACTIVE"]
    statuses = ["absent", "running", "absent", "running", "exit 0"]
    code, calls, output = run_keep_training(tmp_path, states, statuses)
    assert code == 0, output
    bring_up = ["scp", "ssh:unpack", "ssh:install", "ssh:data", "ssh:start"]
    assert steps_of(calls) == [
        "describe", "create",                      # absent: request it
        "describe", "describe",                    # waiting, provisioning
        "describe", "ssh:status", *bring_up,       # active, no code on the workers: bring up, start
        "describe", "ssh:status",                  # running
        "describe", "delete", "create",            # suspended (preempted): delete, request again
        "describe", "describe",                    # deleting, waiting
        "describe", "ssh:status", *bring_up,       # a fresh VM: bring up, start (resumes from WORKDIR)
        "describe", "ssh:status",                  # running
        "describe", "ssh:status", "delete",        # exit 0: done, delete
    ]
    creates = [argv for argv in calls if argv[2:4] == ["queued-resources", "create"]]
    for argv in creates:
        assert argv[4] == "m2io-test-qr" and "--node-id=m2io-test" in argv and "--spot" in argv
        assert "--accelerator-type=v5litepod-16" in argv and "--runtime-version=v2-alpha-tpuv5-lite" in argv
    starts = [a for argv in calls for a in argv if "worker.sh start" in a]
    assert len(starts) == 2 and all("--workdir=gs://m2io-bucket/runs/inserter_3b" in s for s in starts)
    deletes = [argv for argv in calls if argv[2:4] == ["queued-resources", "delete"]]
    assert len(deletes) == 2 and all(argv[4] == "m2io-test-qr" and "--force" in argv for argv in deletes)
    assert "is SUSPENDED (preempted or not served): deleting it and requesting it again (1)" in output


def test_keep_training_restarts_a_trainer_that_saved_on_preemption(tmp_path):
    """exit 75 on a VM that is still ACTIVE: start again without a new bring-up; an ssh failure only waits."""
    code, calls, output = run_keep_training(tmp_path, ["ACTIVE"] * 5,
                                            ["SSH_FAILS", "running", "exit 75", "running", "exit 0"])
    assert code == 0, output
    assert steps_of(calls) == ["describe", "ssh:status",               # ssh failed: wait
                               "describe", "ssh:status",               # running
                               "describe", "ssh:status", "ssh:start",  # exit 75: start again, no bring-up
                               "describe", "ssh:status", "describe", "ssh:status", "delete"]


def test_keep_training_stops_on_a_failed_trainer_and_keeps_the_vm(tmp_path):
    code, calls, output = run_keep_training(tmp_path, ["ACTIVE"], ["exit 1"])
    assert code == 1
    assert steps_of(calls) == ["describe", "ssh:status"]
    assert "the trainer failed (exit 1); the VM is kept" in output


def test_keep_training_gives_up_after_max_recreate(tmp_path):
    code, calls, output = run_keep_training(tmp_path, ["FAILED"] * 4, [])
    assert code == 1
    assert steps_of(calls) == ["describe", "delete", "create"] * 3 + ["describe"]
    assert "after 3 recreations (MAX_RECREATE=3): giving up" in output
