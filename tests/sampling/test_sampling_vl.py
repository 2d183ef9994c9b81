"""Sampler on a tiny Qwen2.5-VL: greedy parity with transformers generate (images, M-RoPE decode positions)."""

import numpy as np
import pytest
import torch

from m2io_jax import models, sampling
from tests.models.qwen2_5_vl_helpers import MAX_PIXELS, MIN_PIXELS, random_image, tiny_hf_config, tiny_tokenizer

PROMPTS = [
    ("Where does <|vision_start|><|image_pad|><|vision_end|> go?", [(56, 84)]),
    ("A cat <|vision_start|><|image_pad|><|vision_end|> sits on <|vision_start|><|image_pad|><|vision_end|> a mat.",
     [(112, 56), (56, 56)]),
    ("You are a helpful assistant.", []),
]


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """A tiny random Qwen2.5-VL with weights large enough that greedy steps are rarely near ties."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "language_model" in name or "lm_head" in name:
                p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp("sampling_vl")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(path)
    return str(path), model


def processed(path, model):
    from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

    processor = Qwen2_5_VLProcessor.from_pretrained(path, config=model.config)
    images = [[random_image(h, w, seed=10 * i + j) for j, (h, w) in enumerate(sizes)]
              for i, (_, sizes) in enumerate(PROMPTS)]
    rows = [processor([text], [imgs]) for (text, _), imgs in zip(PROMPTS, images)]
    return processor([t for t, _ in PROMPTS], images), rows


def prompts_and_images(rows):
    """Token lists and per-prompt processor outputs (None for a prompt without images) for `generate`."""
    return [r.input_ids[0].tolist() for r in rows], [r if r.pixel_values is not None else None for r in rows]


@pytest.fixture(scope="module")
def vl_model_and_rows(vl_checkpoint):
    path, _ = vl_checkpoint
    model = models.from_pretrained(path)
    return model, processed(path, model)[1]


def test_vl_greedy_matches_transformers_generate(vl_checkpoint):
    path, reference = vl_checkpoint
    model = models.from_pretrained(path)
    batch, rows = processed(path, model)
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.hf_kwargs().items()}
    kwargs["input_ids"] = kwargs["input_ids"].long()
    with torch.no_grad():
        out = reference.generate(**kwargs, do_sample=False, max_new_tokens=16, min_new_tokens=16, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[:, batch.input_ids.shape[1]:].tolist()
    top2 = torch.stack(out.scores, dim=1).topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).numpy()

    prompts, images = prompts_and_images(rows)
    ours = sampling.generate(model, prompts, max_new_tokens=16, images=images)
    for row, (mine, theirs) in enumerate(zip(ours.tokens, expected)):
        near_tie = np.flatnonzero(gaps[row] < 1e-4)
        upto = int(near_tie[0]) + 1 if near_tie.size else len(theirs)
        assert upto >= 8, f"row {row}: near tie at step {upto - 1}; pick other weights"
        assert mine[:upto] == theirs[:upto], f"row {row}"


def test_vl_shared_prefill_equals_repeated_prompts(vl_model_and_rows):
    model, rows = vl_model_and_rows
    prompts = [r.input_ids[0].tolist() for r in rows[:2]]
    images = [{"pixel_values": r.pixel_values, "image_grid_thw": r.image_grid_thw} for r in rows[:2]]
    kwargs = dict(max_new_tokens=8, num_samples=3, temperature=1.0, seed=3, images=images)
    shared = sampling.generate(model, prompts, **kwargs)
    repeated = sampling.generate_repeated(model, prompts, **kwargs)
    assert shared.tokens == repeated.tokens
    np.testing.assert_allclose(np.array(shared.logprobs), np.array(repeated.logprobs), atol=1e-5)


def test_vl_image_count_mismatch_raises_before_compiling(vl_model_and_rows):
    model, rows = vl_model_and_rows
    before = sampling.compile_count()
    with pytest.raises(ValueError, match=r"prompts\[0\] holds .* image tokens"):
        sampling.generate(model, [rows[0].input_ids[0].tolist()], max_new_tokens=4, images=[rows[1]])
    with pytest.raises(ValueError, match="one processor output"):
        sampling.generate(model, [rows[0].input_ids[0].tolist()], max_new_tokens=4, images=[rows[0], rows[1]])
    assert sampling.compile_count() == before


def test_vl_sharded_sampling_matches_single_device(vl_checkpoint, vl_model_and_rows):
    from m2io_jax import sharding as shd

    path, _ = vl_checkpoint
    model, rows = vl_model_and_rows
    prompts, images = prompts_and_images(rows)
    kwargs = dict(max_new_tokens=8, num_samples=2, temperature=1.0, seed=5, images=images)
    single = sampling.generate(model, prompts, **kwargs)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_model = models.from_pretrained(path, mesh=mesh)
    assert "fsdp" in str(sharded_model.language_model.layers.gate_proj[...].sharding.spec)
    sharded = sampling.generate(sharded_model, prompts, **kwargs)
    assert sharded.tokens == single.tokens
    np.testing.assert_allclose(np.array(sharded.logprobs), np.array(single.logprobs), atol=1e-5)


def test_vl_precompile_then_generate_compiles_nothing(vl_model_and_rows):
    model, rows = vl_model_and_rows
    prompts, images = prompts_and_images(rows)
    grids = np.concatenate([r.image_grid_thw for r in rows if r.image_grid_thw is not None])
    kwargs = dict(max_new_tokens=20, num_samples=2, temperature=1.0)  # a new-token bucket no other test uses
    before = sampling.compile_count()
    sampling.precompile(model, batch_size=len(prompts), prompt_length=max(map(len, prompts)),
                        image_grid_thw=grids, **kwargs)
    assert sampling.compile_count() > before  # it compiled the prefill (vision tower included) and decode
    before = sampling.compile_count()
    sampling.generate(model, prompts, images=images, seed=1, **kwargs)
    assert sampling.compile_count() == before
    with pytest.raises(ValueError, match=r"prompt 0 of 1 would hold .* image tokens .* more than prompt_length=8"):
        sampling.precompile(model, batch_size=1, prompt_length=8, image_grid_thw=grids, **kwargs)
