"""Logits parity of the Flax Qwen2 port against transformers' PyTorch Qwen2ForCausalLM on the same weights."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2io_jax import models
from tests.conftest import TINY_QWEN2, left_padded_batch


def torch_logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(TINY_QWEN2))
@pytest.mark.parametrize("lengths", [(7, 7), (11, 4, 8)], ids=["no_padding", "left_padding"])
def test_float32_logits_match_transformers(tiny_qwen2, name, lengths):
    path, reference = tiny_qwen2[name]
    ids, mask, positions = left_padded_batch(TINY_QWEN2[name]["vocab_size"], lengths, seed=len(lengths))
    ours = np.asarray(models.from_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask)))
    expected = torch_logits(reference, ids, mask, positions)
    valid = mask.astype(bool)
    assert ours.shape == expected.shape
    np.testing.assert_array_less(np.abs(ours - expected)[valid].max(), 1e-4)


@pytest.mark.parametrize("name", ["tied_gqa", "untied_mha"])
def test_bfloat16_error_at_most_twice_torch_bfloat16(tiny_qwen2, name):
    path, reference = tiny_qwen2[name]
    ids, mask, positions = left_padded_batch(TINY_QWEN2[name]["vocab_size"], (12, 5), seed=3)
    exact = torch_logits(reference, ids, mask, positions)
    torch_bf16 = torch_logits(copy.deepcopy(reference).to(torch.bfloat16), ids, mask, positions)
    ours = np.asarray(models.from_pretrained(path, dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    our_error = np.abs(ours - exact)[valid].max()
    torch_error = np.abs(torch_bf16 - exact)[valid].max()
    assert torch_error > 0
    assert our_error <= 2 * torch_error, (our_error, torch_error)
