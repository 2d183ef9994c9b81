"""Qwen2.5-VL parity with transformers on tiny random weights: vision tower, M-RoPE positions, logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m2io_jax.models import qwen2_5_vl as vl
from m2io_jax.models import qwen2_5_vl_inputs as vl_inputs
from tests.models.qwen2_5_vl_helpers import IMAGE_TOKEN_ID, conversation, hf_logits, images_for

TOWER_GRID = np.array([[1, 20, 14], [1, 6, 8], [1, 18, 26], [2, 4, 4]])  # last: two frames, as a video would be


def _tower_reference(hf_model) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.random.default_rng(0).standard_normal((int(TOWER_GRID.prod(1).sum()), 1176)).astype(np.float32)
    with torch.no_grad():
        ref = hf_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(TOWER_GRID)).pooler_output
    return pixels, ref.numpy()


def _assert_tower_matches(tower: vl.VisionTower, pixels: np.ndarray, ref: np.ndarray) -> None:
    inputs = vl_inputs.plan_vision_inputs(pixels, TOWER_GRID, tower.config)
    out = np.asarray(jax.jit(lambda m, x: m(x))(tower, inputs))
    assert out.shape[0] >= ref.shape[0]
    np.testing.assert_allclose(out[:ref.shape[0]], ref, atol=1e-5, rtol=0)


def test_vision_tower_matches_transformers(hf_model, jax_model):
    _assert_tower_matches(jax_model.visual, *_tower_reference(hf_model))


def test_full_attention_in_query_blocks_matches_transformers(hf_model, jax_model):
    pixels, ref = _tower_reference(hf_model)
    cfg = jax_model.config.vision
    images, row_len = vl_inputs.plan_vision_inputs(pixels, TOWER_GRID, cfg).image_valid.shape
    budget = images * cfg.num_heads * row_len * (row_len // 4)  # about four query blocks per image row
    assert vl.query_block_size(images, cfg.num_heads, row_len, budget) < row_len
    tower = vl.VisionTower(dataclasses.replace(cfg, full_attention_block_scores=budget), rngs=nnx.Rngs(1))
    nnx.update(tower, nnx.state(jax_model.visual))
    _assert_tower_matches(tower, pixels, ref)


def test_query_block_size_divides_the_row_and_respects_the_budget():
    assert vl.query_block_size(16, 4, 1024, 1 << 22) == 64
    assert vl.query_block_size(1, 1, 96, 96 * 40) == 32  # largest divisor of 96 that is <= 40
    assert vl.query_block_size(1, 1, 97, 96 * 40) == 1  # prime row length: one query row per step
    assert vl.query_block_size(2, 2, 64, 1 << 30) == 64  # budget above the whole row: one step


def test_positions_match_transformers(hf_model, processor):
    batch = processor([conversation(2), conversation(0, "A cat."), conversation(1)],
                      images=[images_for(2), [], images_for(1, seed=5)])
    mm = torch.from_numpy((batch.input_ids == IMAGE_TOKEN_ID).astype(np.int64))
    ref_pos, ref_delta = hf_model.model.get_rope_index(
        torch.from_numpy(batch.input_ids).long(), mm_token_type_ids=mm,
        image_grid_thw=torch.from_numpy(batch.image_grid_thw), attention_mask=torch.from_numpy(batch.attention_mask))
    valid = batch.attention_mask.astype(bool)
    pos = batch.model_inputs.positions
    np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
    rope_deltas = batch.model_inputs.next_position - batch.attention_mask.sum(axis=1)
    np.testing.assert_array_equal(rope_deltas, ref_delta.numpy()[:, 0])


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_logits_match_transformers(hf_model, jax_model, processor, num_images):
    batch = processor([conversation(num_images)], images=[images_for(num_images)])
    ref = hf_logits(hf_model, batch)
    out = np.asarray(jax_model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.attention_mask))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_batch_of_prompts_with_different_image_counts(hf_model, jax_model, processor):
    batch = processor([conversation(1), conversation(2, "A cat sits on a red mat.")],
                      images=[images_for(1, seed=3), images_for(2, seed=7)])
    assert batch.attention_mask.min() == 0  # left padding in play
    ref = hf_logits(hf_model, batch)
    out = np.asarray(vl.logits_from_inputs(jax_model, batch.model_inputs))
    valid = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_precomputed_vision_features_give_the_same_logits(jax_model, processor):
    batch = processor([conversation(2)], images=[images_for(2)])
    x = batch.model_inputs
    full = np.asarray(vl.logits_from_inputs(jax_model, x))

    @jax.jit
    def with_features(model, x):
        features = model.encode_images(x.vision)
        hidden, _ = model.forward(x.ids, positions=x.positions, segment_ids=x.mask,
                                  image_token_index=x.image_index, vision_features=features)
        return model.logits(hidden)

    np.testing.assert_allclose(np.asarray(with_features(jax_model, x)), full, atol=1e-6)


def test_decoding_after_the_prompt_uses_rope_deltas(jax_model, processor):
    """Prefill into a KV cache, then one decode step at the prepared position after the prompt (real tokens so far
    + rope_delta) equals the full forward over the longer sequence (left-padded rows included)."""
    batch = processor([conversation(1), conversation(2)], images=[images_for(1), images_for(2)])
    x = batch.model_inputs
    next_token = np.array([[11], [12]], np.int32)
    ids = np.concatenate([x.ids, next_token], axis=1)
    mask = np.concatenate([x.mask, np.ones((2, 1), np.int32)], axis=1)
    full = vl_inputs.prepare_inputs(jax_model.config, ids, attention_mask=mask, pixel_values=batch.pixel_values,
                             image_grid_thw=batch.image_grid_thw)
    want = np.asarray(vl.logits_from_inputs(jax_model, full))[:, -1]

    @jax.jit
    def prefill_then_step(model, x, token, step_positions):
        cache = model.init_cache(2, x.ids.shape[1] + 1)
        _, cache = model.forward(x.ids, positions=x.positions, segment_ids=x.mask,
                                 image_token_index=x.image_index, vision=x.vision, cache=cache)
        hidden, _ = model.forward(token, positions=step_positions, segment_ids=jnp.ones_like(token), cache=cache)
        return model.logits(hidden)[:, -1]

    step_positions = np.broadcast_to(x.next_position[None, :, None], (3, 2, 1)).astype(np.int32)
    got = np.asarray(prefill_then_step(jax_model, x, next_token, step_positions))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_new_image_size_in_the_same_bucket_does_not_recompile(jax_model):
    cfg = jax_model.config.vision
    traces = []

    @jax.jit
    def encode(model, x):
        traces.append(1)
        return model.encode_images(x)

    for grid in ([[1, 8, 12]], [[1, 12, 8]], [[1, 6, 16]]):  # 2 windows and 96 patches each: one bucket
        grid = np.array(grid)
        pixels = np.zeros((int(grid.prod()), cfg.patch_dim), np.float32)
        encode(jax_model, vl_inputs.plan_vision_inputs(pixels, grid, cfg))
    assert len(traces) == 1


def test_vision_tower_gradients_with_remat_equal_without(jax_model):
    cfg = jax_model.config.vision
    grid = np.array([[1, 12, 8], [1, 6, 4]])
    pixels = np.random.default_rng(2).standard_normal((int(grid.prod(1).sum()), cfg.patch_dim)).astype(np.float32)
    inputs = vl_inputs.plan_vision_inputs(pixels, grid, cfg)

    def grads(remat):
        tower = vl.VisionTower(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(1))
        nnx.update(tower, nnx.state(jax_model.visual))
        def loss(t):
            return jnp.sum(t(inputs)[:60] ** 2)  # the 60 real features (48 + 12)

        return nnx.grad(loss)(tower)

    plain, rematted = grads("none"), grads("full")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(plain.blocks.qkv[...]).max()) > 0  # the loss reaches the scanned block weights
