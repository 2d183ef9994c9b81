"""Fit before step 0: the decision on fabricated numbers, per-device bytes of sharded state, the measurement of a
tiny policy's compiled programs, and the skip where the backend reports no memory (CPU)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from m2io_jax import fit, sharding
from m2io_jax.models import lora
from m2io_jax.rl import config as rl_config
from tests.rl import trainer_helpers as helpers

KNOB_WORDS = ("batch", "num_generations", "remat", "LoRA", "mesh")
GIB = 2 ** 30


def test_decide_fits_when_state_plus_largest_temporaries_are_under_the_headroom():
    resident = {"parameters": 2 * GIB, "optimizer": 4 * GIB}
    temporaries = {"grpo_gradients": 3 * GIB, "apply_gradients": 1 * GIB}
    report = fit.decide(resident, temporaries, 10 * GIB, headroom=0.9)
    assert report.fits is True
    assert "9.00 GiB per device" in report.message and "temporaries of grpo_gradients 3.00 GiB" in report.message


def test_decide_does_not_fit_and_names_every_knob():
    resident = {"parameters": 2 * GIB, "optimizer": 4 * GIB, "KV cache": 3 * GIB}
    report = fit.decide(resident, {"grpo_gradients": 1 * GIB}, 10 * GIB, headroom=0.9)  # 10 GiB > 9 GiB usable
    assert report.fits is False
    assert report.message.startswith("does not fit in device memory: 10.00 GiB per device")
    assert "KV cache 3.00 GiB" in report.message
    assert all(word in report.message for word in KNOB_WORDS)


def test_decide_without_device_memory_says_the_check_was_skipped():
    report = fit.decide({"parameters": GIB}, {}, None)
    assert report.fits is None and "fit check skipped" in report.message


def test_per_device_bytes_counts_one_shard():
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(jnp.zeros((8, 4), jnp.float32),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    assert fit.per_device_bytes({"a": sharded, "b": jnp.zeros((3,), jnp.bfloat16)}) == 4 * 4 + 3 * 2


def test_longest_picks_the_longest_prompts():
    assert fit.longest([[1], [1, 2, 3], [1, 2], [1, 2, 3, 4]], 2) == [3, 1]


def test_check_on_cpu_is_skipped_and_compiles_nothing(monkeypatch):
    monkeypatch.setattr(fit, "measure", lambda *a, **k: pytest.fail("measure ran though the backend has no memory"))
    report = fit.check(helpers.tiny_text_model(), helpers.trainer_config(), stage="grpo", prompts=helpers.PROMPTS,
                       images=None, completion_length=8)
    assert report.fits is None and report.message.startswith("grpo: fit check skipped: the cpu backend")


def test_measure_compiles_the_grpo_programs_and_check_decides_on_a_given_capacity():
    model = helpers.tiny_text_model()
    config = helpers.trainer_config(num_generations=4, beta=0.04)
    resident, temporaries = fit.measure(model, config, stage="grpo", prompts=helpers.PROMPTS, images=None,
                                        completion_length=8)
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert resident["parameters"] == params and resident["reference"] == params  # float32 compute
    assert resident["optimizer"] > params and resident["KV cache"] > 0
    assert set(temporaries) == {"grpo_gradients", "apply_gradients", "logprobs"}
    assert temporaries["grpo_gradients"] > 0
    needed = sum(resident.values()) + max(temporaries.values())
    kwargs = dict(stage="grpo", prompts=helpers.PROMPTS, images=None, completion_length=8)
    assert fit.check(model, config, capacity=2 * needed, **kwargs).fits is True
    small = fit.check(model, config, capacity=needed, **kwargs)
    assert small.fits is False and all(word in small.message for word in KNOB_WORDS)


def test_measure_on_a_mesh_counts_the_shards_one_device_holds():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    model = helpers.tiny_text_model()
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    resident, temporaries = fit.measure(model, helpers.trainer_config(), stage="sft", prompts=helpers.PROMPTS,
                                        images=None, completion_length=8, mesh=mesh)
    assert resident["parameters"] < total / 2  # sharded over fsdp
    assert set(temporaries) == {"sft_update"} and temporaries["sft_update"] > 0


def test_measure_with_lora_counts_adapter_gradients_and_no_reference_copy():
    model = helpers.tiny_text_model()
    lora_config = rl_config.get_lora_config()
    lora_config.rank = 2
    adapted = nnx.eval_shape(lambda: lora.apply_config(nnx.clone(model), lora_config))  # abstract: no memory
    config = helpers.trainer_config(num_generations=2, beta=0.04)
    resident, temporaries = fit.measure(adapted, config, stage="grpo", prompts=helpers.PROMPTS, images=None,
                                        completion_length=8)
    base = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert "reference" not in resident and not lora.has_adapters(model)
    assert 0 < resident["gradient accumulator"] < base / 4 and resident["optimizer"] < base / 2
    assert resident["parameters"] > base and temporaries["grpo_gradients"] > 0
