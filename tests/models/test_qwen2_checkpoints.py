"""Export to the Hugging Face layout, sharded checkpoints, and errors on bad checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from m2io_jax import models
from m2io_jax.models import hf
from tests.conftest import TINY_QWEN2, left_padded_batch


def logits_of(torch_model, ids, mask, positions):
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("name", ["tied_gqa", "untied_mha"])
def test_export_then_transformers_reload_is_identical(tiny_qwen2, tmp_path, name):
    path, reference = tiny_qwen2[name]
    ours = models.from_pretrained(path)
    models.save_pretrained(ours, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids, mask, positions = left_padded_batch(TINY_QWEN2[name]["vocab_size"], (6, 9), seed=7)
    np.testing.assert_array_equal(logits_of(reloaded, ids, mask, positions), logits_of(reference, ids, mask, positions))
    np.testing.assert_array_equal(
        np.asarray(models.from_pretrained(tmp_path / "export")(jnp.asarray(ids), jnp.asarray(mask))),
        np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))))


def test_sharded_checkpoint_with_index_round_trips(tiny_qwen2, tmp_path):
    path, reference = tiny_qwen2["untied_mha"]
    ours = models.from_pretrained(path)
    models.registry._module_for("qwen2", "test").save_pretrained(ours, str(tmp_path / "split"), max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(tmp_path / "split") if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(tmp_path / "split" / hf.INDEX_FILE)
    ids, mask, positions = left_padded_batch(384, (5, 8), seed=8)
    np.testing.assert_array_equal(np.asarray(models.from_pretrained(tmp_path / "split")(ids, mask)),
                                  np.asarray(ours(ids, mask)))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "split")).eval()
    np.testing.assert_array_equal(logits_of(reloaded, ids, mask, positions), logits_of(reference, ids, mask, positions))


def test_bfloat16_export_then_transformers_reload_is_identical(tiny_qwen2, tmp_path):
    """Our bfloat16 weights, exported and reloaded by transformers, give the logits of the reference cast to bf16."""
    path, reference = tiny_qwen2["tied_gqa"]
    models.save_pretrained(models.from_pretrained(path, dtype=jnp.bfloat16), tmp_path / "bf16")
    header, _ = hf._read_header(str(tmp_path / "bf16" / hf.SINGLE_FILE))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # transformers' own bf16 load of the float32 checkpoint (its rotary tables stay float32, as in the reload).
    reference_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask, positions = left_padded_batch(TINY_QWEN2["tied_gqa"]["vocab_size"], (6, 9), seed=9)
    expected = logits_of(reference_bf16, ids, mask, positions)  # [B, T, vocab]
    assert np.abs(expected - logits_of(reference, ids, mask, positions)).max() > 0  # bf16 rounding is visible
    np.testing.assert_array_equal(logits_of(reloaded, ids, mask, positions), expected)


@pytest.fixture
def broken_copy(tiny_qwen2, tmp_path):
    """A writable copy of a tiny checkpoint and a function that rewrites one of its tensors."""
    source, _ = tiny_qwen2["tied_gqa"]
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    weights = str(target / hf.SINGLE_FILE)

    def rewrite(edit):
        checkpoint = hf.SafetensorsCheckpoint(str(target))
        tensors = {name: np.array(checkpoint.read(name)) for name in checkpoint._entries}
        del checkpoint
        edit(tensors)
        hf.write_safetensors(weights, list(tensors.items()))

    return target, rewrite


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        models.from_pretrained(tmp_path)


def test_unsupported_model_type(broken_copy):
    target, _ = broken_copy
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "llama4"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'llama4'"):
        models.from_pretrained(target)


def test_missing_tensor(broken_copy):
    target, rewrite = broken_copy
    rewrite(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        models.from_pretrained(target)


def test_tensor_of_wrong_shape(broken_copy):
    target, rewrite = broken_copy
    rewrite(lambda t: t.update({"model.norm.weight": np.ones((63,), np.float32)}))
    with pytest.raises(ValueError,
                       match=r"model.safetensors: tensor 'model.norm.weight' has shape \(63,\); expected \(64,\)"):
        models.from_pretrained(target)


def test_tensor_of_uncastable_dtype(broken_copy):
    target, rewrite = broken_copy
    rewrite(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones((64,), np.int32)}))
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.q_proj.bias' has dtype I32"):
        models.from_pretrained(target)


def test_requested_dtype_that_parameters_cannot_take(tiny_qwen2):
    with pytest.raises(TypeError, match="cannot load parameters as dtype int32"):
        models.from_pretrained(tiny_qwen2["tied_gqa"][0], dtype=jnp.int32)


def test_overrides_set_run_fields_and_name_unknown_ones(tiny_qwen2):
    path, _ = tiny_qwen2["tied_gqa"]
    ids, mask, _ = left_padded_batch(TINY_QWEN2["tied_gqa"]["vocab_size"], (5, 8), seed=3)
    plain = models.from_pretrained(path)
    rematted = models.from_pretrained(path, overrides={"remat": "full"})
    assert rematted.config.remat == "full" and plain.config.remat == "none"
    np.testing.assert_allclose(np.asarray(rematted(ids, mask)), np.asarray(plain(ids, mask)), atol=1e-6)
    with pytest.raises(KeyError,
                       match=r"config\.json: override 'rematt': Qwen2Config has no field 'rematt' \(fields: "):
        models.from_pretrained(path, overrides={"rematt": "full"})
