"""Qwen2.5-VL weights in/out, sharded execution, abstract 3B init, and errors on bad input."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from flax import nnx

from m2io_jax import sharding
from m2io_jax.models import from_pretrained, save_pretrained
from m2io_jax.models import qwen2_5_vl as vl
from m2io_jax.models.hf import parameter_count
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionBuckets
from m2io_jax.models.qwen2_5_vl_inputs import plan_vision_inputs
from tests.models.qwen2_5_vl_helpers import conversation, hf_logits, images_for, random_image


@pytest.fixture(scope="module")
def two_image_batch(processor):
    return processor([conversation(1), conversation(2)], images=[images_for(1, seed=1), images_for(2, seed=4)])


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_logits_equal_single_device(tiny_checkpoint, jax_model, two_image_batch, mesh_shape):
    want = np.asarray(vl.logits_from_inputs(jax_model, two_image_batch.model_inputs))
    mesh = sharding.make_mesh(mesh_shape)
    model = from_pretrained(tiny_checkpoint, mesh=mesh)
    qkv = model.visual.blocks.qkv[...]
    assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        got = np.asarray(vl.logits_from_inputs(model, two_image_batch.model_inputs))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_export_then_transformers_reload_gives_identical_logits(hf_model, jax_model, two_image_batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    save_pretrained(jax_model, tmp_path)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = np.asarray(vl.logits_from_inputs(jax_model, two_image_batch.model_inputs))
    theirs = hf_logits(reloaded, two_image_batch)
    np.testing.assert_array_equal(theirs, hf_logits(hf_model, two_image_batch))  # bit-exact weight round trip
    valid = two_image_batch.attention_mask.astype(bool)
    np.testing.assert_allclose(theirs[valid], ours[valid], atol=1e-4, rtol=0)
    again = from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(jax_model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


QWEN2_5_VL_3B = {  # config.json of Qwen/Qwen2.5-VL-3B-Instruct (hub layout: flat text keys)
    "model_type": "qwen2_5_vl", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
    "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 128000, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


def test_abstract_init_of_the_3b_config_counts_its_parameters():
    config = Qwen2_5_VLConfig.from_hf(QWEN2_5_VL_3B)
    abstract = nnx.eval_shape(lambda: vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    count = parameter_count(abstract)
    assert count == config.num_parameters
    assert 3.70e9 < count < 3.80e9, count  # published: 3.75 B


# ------------------------------------------------------------------------------------------- bad input


def test_corrupt_image_bytes_are_named(processor):
    buf = io.BytesIO()
    random_image(40, 60, 0).save(buf, format="PNG")
    with pytest.raises(ValueError, match=r"prompt 1 image 0: cannot decode image bytes"):
        processor([conversation(0), conversation(1)], images=[[], [buf.getvalue()[:50]]])


def test_zero_size_image_is_named(processor):
    with pytest.raises(ValueError, match=r"prompt 0 image 1: image has zero size 0x5"):
        processor([conversation(2)], images=[[random_image(40, 60, 0), np.zeros((5, 0, 3), np.uint8)]])


def test_placeholder_and_image_counts_must_agree(processor):
    with pytest.raises(ValueError, match=r"prompt 0: 2 <\|image_pad\|> placeholders but 1 images"):
        processor([conversation(2)], images=[images_for(1)])


@pytest.mark.parametrize("extra", [1, -1])
def test_image_token_count_must_match_the_features(jax_model, processor, extra):
    batch = processor([conversation(1)], images=[images_for(1)])
    ids = batch.input_ids
    image_at = np.flatnonzero(ids[0] == jax_model.config.image_token_id)
    if extra > 0:
        ids = np.concatenate([ids[:, :image_at[0]], ids[:, image_at[:1]], ids[:, image_at[0]:]], axis=1)
    else:
        ids = np.delete(ids, image_at[0], axis=1)
    found = len(image_at) + extra
    with pytest.raises(ValueError, match=rf"input_ids hold {found} <\|image_pad\|> tokens .* {len(image_at)} vision "
                                         r"features"):
        jax_model(ids, batch.pixel_values, batch.image_grid_thw)


def test_image_over_the_pixel_budget_is_named(jax_model):
    config = jax_model.config.vision
    grid = np.array([[1, 8, 8], [1, 40, 60]])
    pixels = np.zeros((int(grid.prod(1).sum()), config.patch_dim), np.float32)
    with pytest.raises(ValueError, match=r"image 1: grid 40x60 = 2400 patches .* over the pixel budget "
                                         r"max_image_patches=1024"):
        plan_vision_inputs(pixels, grid, config, VisionBuckets(max_image_patches=1024))


def test_input_image_over_the_input_pixel_budget_is_named(processor):
    from m2io_jax.models.qwen2_5_vl_processor import load_image

    with pytest.raises(ValueError, match=r"prompt 0 image 0: image of 300x200 = 60000 pixels is over"):
        load_image(random_image(200, 300, 0), name="prompt 0 image 0", max_input_pixels=50000)


def test_no_torch_at_import_time():
    import subprocess
    import sys

    code = ("import sys, m2io_jax.models.qwen2_5_vl, m2io_jax.models.qwen2_5_vl_hf, "
            "m2io_jax.models.qwen2_5_vl_processor, m2io_jax.sampling; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})



def test_processor_max_pixels_follows_the_model_pixel_budget(tiny_checkpoint, jax_model):
    import dataclasses

    from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

    config = dataclasses.replace(jax_model.config, buckets=VisionBuckets(max_image_patches=256))
    lowered = Qwen2_5_VLProcessor.from_pretrained(tiny_checkpoint, config=config)
    assert lowered.image_processor.size.longest_edge == 256 * 14 * 14
    batch = lowered([conversation(1)], images=[[random_image(600, 900, 0)]])
    assert int(batch.image_grid_thw[0, 1] * batch.image_grid_thw[0, 2]) <= 256
    with pytest.raises(ValueError, match=r"max_pixels=250000 is over the model's pixel budget 50176"):
        Qwen2_5_VLProcessor.from_pretrained(tiny_checkpoint, config=config, max_pixels=250000)


def test_overrides_reach_the_nested_text_and_vision_configs(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint, overrides={
        "text.remat": "full", "vision.remat": "save_dots", "vision.full_attention_block_scores": 1 << 28,
        "buckets": VisionBuckets(windows=(8, 64))})
    assert model.language_model.config.remat == "full"
    assert model.visual.config.remat == "save_dots" and model.visual.config.full_attention_block_scores == 1 << 28
    assert model.config.buckets.windows == (8, 64)
    with pytest.raises(KeyError, match=r"override 'vision\.depht': VisionConfig has no field 'depht'"):
        from_pretrained(tiny_checkpoint, overrides={"vision.depht": 2})
