"""The same Qwen2 logits on 1 device and on meshes of 8 fake CPU devices, with the intended shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m2io_jax import models, sharding
from m2io_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from tests.conftest import left_padded_batch

MESHES = [dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=4, tensor=1), dict(data=1, fsdp=1, tensor=8)]
MESH_IDS = ["1x2x4", "2x4x1", "1x1x8"]


def spec_of(model, *path):
    node = model
    for name in path:
        node = getattr(node, name)
    return node[...].sharding.spec


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    """tied_gqa: 2 KV heads (fewer than the tensor axis) and MLP width 100 (not divisible by 8)."""
    path, _ = tiny_qwen2["tied_gqa"]
    ids, mask, _ = left_padded_batch(512, (10, 6, 8, 3), seed=5)
    logits = np.asarray(models.from_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask)))
    return path, ids, mask, logits


@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_sharded_logits_equal_single_device(reference, shape):
    path, ids, mask, expected = reference
    mesh = sharding.make_mesh(shape)
    model = models.from_pretrained(path, mesh=mesh)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_large_matrices_are_sharded_as_declared(reference):
    path = reference[0]
    model = models.from_pretrained(path, mesh=sharding.make_mesh(MESHES[0]))
    # embed dim 64 over fsdp (2); 8 query heads over tensor (4); 2 KV heads do not divide 4: replicated.
    assert spec_of(model, "embed_tokens") == P("tensor", "fsdp")
    assert spec_of(model, "layers", "q_proj") == P(None, "fsdp", "tensor", None)
    assert spec_of(model, "layers", "k_proj") == P(None, "fsdp", None, None)
    assert spec_of(model, "layers", "o_proj") == P(None, "tensor", None, "fsdp")
    assert spec_of(model, "layers", "gate_proj") == P(None, "fsdp", "tensor")  # 100 % 4 == 0
    model8 = models.from_pretrained(path, mesh=sharding.make_mesh(MESHES[2]))
    assert spec_of(model8, "layers", "gate_proj") == P(None, None, None)  # 100 % 8 != 0: replicated
    assert spec_of(model8, "layers", "down_proj") == P(None, None, None)
    assert spec_of(model8, "layers", "q_proj") == P(None, None, "tensor", None)
    model_dp = models.from_pretrained(path, mesh=sharding.make_mesh(MESHES[1]))
    assert spec_of(model_dp, "layers", "q_proj") == P(None, ("fsdp", "data"), None, None)


@pytest.fixture(scope="module")
def divisible_checkpoint(tmp_path_factory):
    """A checkpoint whose every dimension divides 8, so that parameters can be split evenly."""
    from tests.conftest import build_hf_qwen2

    path = tmp_path_factory.mktemp("qwen2_divisible")
    build_hf_qwen2(path, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    return str(path)


def assert_evenly_split(model):
    params = nnx.state(model, nnx.Param)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sharding.per_device_bytes(params)
    assert len(per_device) == 8
    assert max(per_device.values()) <= 1.1 * total / 8, (max(per_device.values()), total / 8)


@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_loaded_parameter_bytes_per_device_when_shapes_divide(divisible_checkpoint, shape):
    assert_evenly_split(models.from_pretrained(divisible_checkpoint, mesh=sharding.make_mesh(shape)))


def test_sharded_initialisation_places_every_shard(divisible_checkpoint):
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    mesh = sharding.make_mesh(MESHES[0])
    model = sharding.create_sharded(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    assert spec_of(model, "layers", "k_proj") == P(None, "fsdp", "tensor", None)
    assert_evenly_split(model)


def test_logical_rules_fall_back_to_replication():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_spec(("batch", "length"), (4, 3), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "length"), (2, 3), mesh) == P("data", None)
    assert sharding.logical_to_spec(("batch", "length"), (1, 3), mesh) == P(None, None)
    assert sharding.logical_to_spec(("kv_heads", "head_dim"), (3, 8), mesh) == P(None, None)
    with sharding.use_rules([("kv_heads", None), ("head_dim", "tensor")]):
        assert sharding.logical_to_spec(("kv_heads", "head_dim"), (4, 8), mesh) == P(None, "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("nonexistent",), (4,), mesh)
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh(dict(data=3, fsdp=4))
