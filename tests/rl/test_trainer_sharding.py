"""GRPO steps on 8 fake devices (data x fsdp x tensor) give the parameters of one device."""

import jax
import numpy as np
from flax import nnx

from m2io_jax import sharding
from m2io_jax.rl import optimizer
from m2io_jax.rl.trainer import PromptBatch, Trainer
from tests.rl.trainer_helpers import PROMPTS, STOP, fraction_reward, tiny_text_model, trainer_config


def _train(mesh, steps: int = 3):
    trainer = Trainer(tiny_text_model(), trainer_config(learning_rate=1e-3), reward_fn=fraction_reward(),
                      stop_tokens=[STOP], mesh=mesh)
    for step in range(steps):
        trainer.grpo_step(PromptBatch(PROMPTS, None, [None] * 4), step=step)
    return nnx.state(trainer.model, nnx.Param)


def test_grpo_on_a_data_fsdp_tensor_mesh_matches_one_device():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single = _train(None)
    sharded = _train(mesh)
    initial = nnx.state(tiny_text_model(), nnx.Param)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), single, initial)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps did change the parameters
    sharded_leaves = jax.tree.leaves(sharded)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in sharded_leaves)  # parameters stayed sharded over the mesh
    for a, b in zip(jax.tree.leaves(single), sharded_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_optimizer_state_starts_sharded_like_the_parameters():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    trainer = Trainer(tiny_text_model(), trainer_config(), reward_fn=None, stop_tokens=[STOP], mesh=mesh)
    params = {optimizer.parameter_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(trainer._params)}
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainer._opt_state):
        name = optimizer.parameter_path(path)
        match = [p for p in params if name.endswith("/" + p) and params[p].shape == leaf.shape]
        if match:
            moments += 1
            assert leaf.sharding == params[match[0]].sharding, name  # never a full copy per device
        else:
            assert leaf.ndim == 0 or leaf.sharding.is_fully_replicated, name
    assert moments == 2 * len(params)  # Adam's mu and nu of every parameter
