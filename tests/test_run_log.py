"""Observability and robust runs: TensorBoard events of a tiny training run read back (tags and steps; its fit
check reported as skipped on CPU), a NaN loss skips its update and stops the run after the configured count, an
unwritable workdir is one clear error."""

import glob
import math
import os
import struct

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from m2io_jax import cli, train
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from m2io_jax.run_log import RunLog, check_writable
from tests.rl import trainer_helpers as helpers
from tests.test_train import CONFIGS, _shrink


def read_events(directory):
    """{tag: [(step, value)]} of the scalars and {tag: [(step, text)]} of the texts in `directory`'s event files.

    Parses the TFRecord framing (length, its CRC, the record, its CRC) with tensorboardX's Event proto.
    """
    scalars, texts = {}, {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.HasField("tensor"):
                    texts.setdefault(value.tag, []).append((event.step, value.tensor.string_val[0].decode()))
    return scalars, texts


def test_run_log_writes_scalars_and_text_and_only_on_process_zero(tmp_path):
    log = RunLog(str(tmp_path), enabled=True)
    log.scalars("grpo", 3, {"reward/mean": 0.5, "kl": np.float32(0.25), "note": "not a number"})
    log.texts("grpo/samples", 3, ["first completion", "second"])
    log.close()
    scalars, texts = read_events(os.path.join(tmp_path, "tensorboard"))
    assert scalars == {"grpo/reward/mean": [(3, 0.5)], "grpo/kl": [(3, 0.25)]}
    assert [step for step, _ in texts["grpo/samples/text_summary"]] == [3]
    assert "first completion" in texts["grpo/samples/text_summary"][0][1]

    quiet = RunLog(str(tmp_path / "other"), enabled=False)
    quiet.scalars("sft", 1, {"loss": 1.0})
    quiet.close()
    assert not os.path.exists(tmp_path / "other" / "tensorboard")


def test_tiny_training_writes_tensorboard_events(tmp_path, capsys):
    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    config.eval.rule_baseline = False
    config.samples_every = 2
    workdir = str(tmp_path / "run")
    train.train(config, workdir)

    scalars, texts = read_events(os.path.join(workdir, "tensorboard"))
    for tag in ("sft/loss", "sft/grad_norm", "sft/skipped_nonfinite", "sft/tokens_per_second", "sft/time/update"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    grpo_tags = ("reward/mean", "reward/std", "reward/format", "reward_std/format", "clip_fraction", "entropy",
                 "completion_length", "truncated_fraction", "logprob_diff/sampler_vs_trainer", "tokens_per_second",
                 "skipped_nonfinite", "time/rollout", "time/reward", "time/logprobs", "time/update", "time/data")
    for tag in grpo_tags:
        assert [step for step, _ in scalars[f"grpo/{tag}"]] == [1, 2], tag
    assert all(value >= 0 for _, value in scalars["grpo/entropy"])
    assert [step for step, _ in scalars["eval/reward"]] == [0, 2, 4]  # init, after SFT, after GRPO
    assert [step for step, _ in texts["grpo/samples/text_summary"]] == [2]
    out = capsys.readouterr().out  # the fit check before step 0: no device memory on CPU
    assert "sft: fit check skipped: the cpu backend" in out and "grpo: fit check skipped: the cpu backend" in out


def _params(trainer):
    return jax.tree.map(np.asarray, jax.device_get(nnx.split(trainer.model)[1]))


def _nan_reward(examples, completions):
    return RewardResult(total=np.full(len(completions), np.nan, np.float32), components={}, counts={})


def test_nan_loss_skips_the_update():
    config = helpers.trainer_config(num_generations=2)
    trainer = Trainer(helpers.tiny_text_model(), config, reward_fn=_nan_reward, stop_tokens=[helpers.STOP])
    before = _params(trainer)
    batch = PromptBatch(token_ids=helpers.PROMPTS[:2], images=None, examples=[None, None])
    metrics = trainer.grpo_step(batch, 1)
    assert metrics["skipped_nonfinite"] == 1.0 and math.isnan(metrics["loss"])
    after = _params(trainer)
    jax.tree.map(np.testing.assert_array_equal, before, after)

    sft = trainer.sft_step(PromptBatch(token_ids=helpers.PROMPTS[:2], images=None, examples=[None, None],
                                       targets=[[8, 9, helpers.STOP], [10, helpers.STOP]]))
    assert sft["skipped_nonfinite"] == 0.0  # a finite loss updates again
    changed = _params(trainer)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(changed)))


def test_run_stops_after_the_configured_nonfinite_steps_in_a_row(tmp_path):
    progress = train.Progress(str(tmp_path), {"grpo": 10}, log_every=1, print_every=100,
                              run_log=RunLog(str(tmp_path), enabled=False), max_nonfinite_in_a_row=2)
    progress.log("grpo", 1, 0.1, {"skipped_nonfinite": 1.0})
    progress.log("grpo", 2, 0.1, {"skipped_nonfinite": 0.0})  # the count restarts
    progress.log("grpo", 3, 0.1, {"skipped_nonfinite": 1.0})
    with pytest.raises(cli.UserError, match=r"grpo step 4: .*NaN or infinite in 2 steps in a row .*"
                                            r"max_nonfinite_in_a_row=2"):
        progress.log("grpo", 4, 0.1, {"skipped_nonfinite": 1.0})


def test_unwritable_workdir_is_reported_before_anything_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = str(blocker / "run")
    with pytest.raises(cli.UserError, match=r"--workdir=.*a_file/run is not writable"):
        check_writable(workdir)
    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    with pytest.raises(cli.UserError, match="is not writable"):
        train.train(config, workdir)
    check_writable(str(tmp_path / "fresh" / "run"))
    assert os.listdir(tmp_path / "fresh" / "run") == []
