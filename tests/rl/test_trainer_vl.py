"""One GRPO step of a tiny Qwen2.5-VL with images: the vision tower runs once (rollout, reference and training
passes reuse its features) and `<|image_pad|>` is never emitted, even with its logit the largest."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from m2io_jax import models, sampling
from m2io_jax.models import tiny
from m2io_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor
from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer
from tests.rl.trainer_helpers import trainer_config

TEXTS = ["a cat sits on a mat", "where does the picture go", "the answer has two sentences"]
IMAGE_PAD = tiny.SPECIAL_TOKENS.index("<|image_pad|>")
STOP = tiny.SPECIAL_TOKENS.index("<|im_end|>")


@pytest.fixture(scope="module")
def vl_model_and_processor(tmp_path_factory):
    # One decoder layer and an untied head: shapes no other test compiles (so the counting callback below is
    # traced into fresh programs), and a head whose `<|image_pad|>` column can be raised on its own.
    path = tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("trainer_vl"), TEXTS, kind="qwen2_5_vl",
                                      vocab_size=300, text_shape={"num_hidden_layers": 1, "tie_word_embeddings": False})
    model = models.from_pretrained(path)
    lm = model.language_model
    lm.embed_tokens.value = lm.embed_tokens.value.at[:, 0].set(100.0)  # final hidden dimension 0 large, positive
    lm.lm_head.value = lm.lm_head.value.at[0, :].set(0.0).at[0, IMAGE_PAD].set(50.0)  # <|image_pad|> dominates
    return model, Qwen2_5_VLProcessor.from_pretrained(path, config=model.config)


def test_grpo_step_runs_the_vision_tower_once_and_never_emits_image_pad(vl_model_and_processor, monkeypatch):
    model, processor = vl_model_and_processor
    executions = []
    encode_images = Qwen2_5_VLForConditionalGeneration.encode_images

    def counted(self, vision):
        features = encode_images(self, vision)
        jax.debug.callback(lambda: executions.append(1))
        return features

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "encode_images", counted)
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))],
              [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))]]
    prompts = ["Where does <|vision_start|><|image_pad|><|vision_end|> go?",
               "Place <|vision_start|><|image_pad|><|vision_end|> after a sentence."]
    rows = [processor([text], [imgs]) for text, imgs in zip(prompts, images)]
    batch = PromptBatch([r.input_ids[0].tolist() for r in rows], rows, examples=[0, 1])
    assert all(IMAGE_PAD in ids for ids in batch.token_ids)
    unsuppressed = sampling.generate(model, batch.token_ids, images=rows, max_new_tokens=2)
    assert all(t == IMAGE_PAD for row in unsuppressed.tokens for t in row)  # its logit is indeed the maximum
    jax.effects_barrier()
    executions.clear()
    seen = []

    def reward(examples, completions):
        seen.extend(completions)
        return RewardResult(np.array([float(len(set(c))) for c in completions]), {}, {})

    config = trainer_config(max_new_tokens=6, num_generations=4, beta=0.1, num_iterations=2)
    config.optimizer.param_rules = (("visual/.*", "frozen"),)
    trainer = Trainer(model, config, reward_fn=reward, stop_tokens=[STOP], suppress_tokens=[IMAGE_PAD])
    metrics = trainer.grpo_step(batch, step=0)
    jax.effects_barrier()
    assert len(executions) == 1  # one tower execution for rollout, old, reference and two training passes
    assert len(seen) == 8 and not any(IMAGE_PAD in c for c in seen)
    assert metrics["logprob_diff/sampler_vs_trainer"] < 1e-4 and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("vision_rule", ["frozen", 0.5])
def test_sft_trains_the_vision_tower_unless_frozen(tmp_path, vision_rule):
    path = tiny.build_tiny_checkpoint(tmp_path, TEXTS, kind="qwen2_5_vl", vocab_size=300,
                                      text_shape={"num_hidden_layers": 1})
    model = models.from_pretrained(path)
    processor = Qwen2_5_VLProcessor.from_pretrained(path, config=model.config)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    row = processor(["Where does <|vision_start|><|image_pad|><|vision_end|> go?"], [[image]])
    batch = PromptBatch([row.input_ids[0].tolist()], [row], examples=[0], targets=[[40, 41, 42, STOP]])
    config = trainer_config()
    config.optimizer.param_rules = (("visual/.*", vision_rule),)
    trainer = Trainer(model, config, reward_fn=None, stop_tokens=[STOP], suppress_tokens=[IMAGE_PAD])
    before = jax.tree.map(np.array, nnx.state(trainer.model.visual))
    trainer.sft_step(batch)
    after = jax.tree.map(np.array, nnx.state(trainer.model.visual))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    if vision_rule == "frozen":
        assert not any(changed)  # bit-identical: features are constants and the optimizer skips the tower
    else:
        assert all(changed)  # the gradient reaches every tower weight through recomputed features
