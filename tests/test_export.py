"""`python -m m2io_jax.export`: a run's checkpoint as a Hugging Face directory that transformers and our
`from_pretrained` load with equal logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from m2io_jax import cli, export, models, train
from m2io_jax.models import lora
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor
from m2io_jax.rl import checkpoint, steps
from tests.models.qwen2_5_vl_helpers import conversation, hf_logits, images_for
from tests.test_train import CONFIGS, ROOT, _shrink


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run of one SFT step, saved as checkpoint 1."""
    config = _shrink(cli.load_config(os.path.join(CONFIGS, "tiny.py")))
    config.sft.num_steps, config.grpo.num_steps = 1, 0
    config.sft.optimizer.learning_rate = 1e-2  # a visible change from the initial weights
    config.eval.before_training = config.eval.rule_baseline = False
    path = str(tmp_path_factory.mktemp("export") / "run")
    train.train(config, path)
    return path


def _logits(model, processor, num_images):
    batch = processor([conversation(num_images)], images=[images_for(num_images)])
    return batch, np.asarray(model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.attention_mask))


@pytest.mark.parametrize("num_images", [0, 1])
def test_export_loads_in_transformers_with_our_logits(workdir, tmp_path, num_images):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = str(tmp_path / "hf")
    assert export.export(workdir, out) == 1
    ours = models.from_pretrained(out)
    processor = Qwen2_5_VLProcessor.from_pretrained(out, config=ours.config)
    batch, logits = _logits(ours, processor, num_images)
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_allclose(logits, hf_logits(hf_model, batch), atol=1e-4, rtol=0)

    trained = _logits(models.from_pretrained(os.path.join(workdir, "final")), processor, num_images)[1]
    np.testing.assert_allclose(logits, trained, atol=1e-5, rtol=0)  # the trained weights, not the initial ones
    initial = _logits(models.from_pretrained(os.path.join(workdir, "init")), processor, num_images)[1]
    assert np.max(np.abs(logits - initial)) > 1e-3


def test_export_command_and_a_missing_step(workdir, tmp_path):
    def command(*args):
        return subprocess.run([sys.executable, "-m", "m2io_jax.export", f"--workdir={workdir}", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    done = command(f"--out={tmp_path / 'hf'}", "--step=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json") and os.path.isfile(
        tmp_path / "hf" / "preprocessor_config.json")
    missing = command(f"--out={tmp_path / 'other'}", "--step=7")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("export: error: ")
    assert "no checkpoint of step 7; it holds steps [1]" in missing.stderr


def test_export_of_a_lora_checkpoint_merges_its_adapters(workdir, tmp_path):
    """A GRPO checkpoint of a run with LoRA (its adapters' B set non-zero here) exports to weights whose plain
    forward is the adapted forward."""
    config = json.load(open(os.path.join(workdir, "config.json")))
    config["lora"]["rank"] = 2
    config["model"]["checkpoint"] = os.path.join(workdir, "init")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    adapted = lora.apply_config(models.from_pretrained(config["model"]["checkpoint"]),
                                ml_collections.ConfigDict(config["lora"]))
    graphdef, params = nnx.split(adapted)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
        if "_b']." in jax.tree_util.keystr(path) else x, params)
    adapted = nnx.merge(graphdef, params)
    checkpoints = checkpoint.RunCheckpoints(str(run), ml_collections.ConfigDict(config["checkpoint"]))
    adapters, _ = steps.split_trainable(True, params)  # what a LoRA run checkpoints: the adapters alone
    checkpoints.save(checkpoint.Position("grpo", 1, 0), {"params": adapters, "opt_state": {"count": jnp.zeros(())}},
                     seed=0, data_state={}, config=config)
    checkpoints.close()

    out = str(tmp_path / "hf")
    assert export.export(str(run), out) == 1
    exported = models.from_pretrained(out)
    processor = Qwen2_5_VLProcessor.from_pretrained(out, config=exported.config)
    logits = _logits(exported, processor, 1)[1]
    np.testing.assert_allclose(logits, _logits(adapted, processor, 1)[1], atol=1e-4, rtol=0)
    plain = _logits(models.from_pretrained(config["model"]["checkpoint"]), processor, 1)[1]
    assert np.max(np.abs(logits - plain)) > 1e-3  # the adapters changed the forward
