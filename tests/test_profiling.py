"""m2io_jax.profiling: the trace window (a real jax.profiler trace whose .xplane.pb parses and holds exactly the
window's steps), and the per-step MFU / rollout-roofline figures of a tiny Qwen2.5-VL against the chip table."""

from __future__ import annotations

import glob
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2io_jax import chips, flops, profiling
from m2io_jax.models import lora, tiny
from tests.rl import trainer_helpers as helpers


def profile_config(**overrides):
    config = profiling.get_profile_config()
    config.update(overrides)
    return config


def traced_steps(workdir) -> list[tuple[str, int]]:
    """(stage, step) of every StepTraceAnnotation in the one trace under workdir/profile, read from the XSpace."""
    files = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(files) == 1, files
    space = jax.profiler.ProfileData.from_file(files[0])
    steps = []
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if event.name in profiling.STAGES and "step_num" in stats:
                    steps.append((event.name, int(stats["step_num"])))
    return sorted(steps)


def run_steps(profiler, stage, steps):
    """Each step a small jitted matmul, inside profiler.step."""
    x = jnp.ones((32, 32))
    for step in steps:
        with profiler.step(stage, step):
            jax.jit(lambda a: a @ a)(x).block_until_ready()


# ---------------------------------------------------------------------------------------------------- the trace
def test_trace_holds_exactly_the_window_and_parses(tmp_path):
    logs = []
    with profiling.Profiler(profile_config(stage="grpo", start_step=2, num_steps=2), str(tmp_path),
                            log=logs.append) as profiler:
        run_steps(profiler, "sft", [1, 2, 3])  # another stage's steps 2 and 3: not traced
        run_steps(profiler, "grpo", [1, 2, 3, 4, 5])
        assert not profiler.tracing  # stopped after step 3, before step 4
    assert traced_steps(tmp_path) == [("grpo", 2), ("grpo", 3)]
    assert any("tracing grpo steps 2-3" in line for line in logs)
    assert any("trace written under" in line for line in logs)


def test_resumed_run_traces_the_rest_of_the_window(tmp_path):
    profiler = profiling.Profiler(profile_config(stage="sft", start_step=2, num_steps=3), str(tmp_path),
                                  log=lambda _: None)
    run_steps(profiler, "sft", [3, 4, 5, 6])  # resumed after step 2
    assert traced_steps(tmp_path) == [("sft", 3), ("sft", 4)]


def test_a_failing_step_stops_the_trace_and_it_never_restarts(tmp_path):
    profiler = profiling.Profiler(profile_config(stage="grpo", start_step=1, num_steps=3), str(tmp_path),
                                  log=lambda _: None)
    run_steps(profiler, "grpo", [1])
    with pytest.raises(RuntimeError, match="step failed"):
        with profiler.step("grpo", 2):
            raise RuntimeError("step failed")
    assert not profiler.tracing
    run_steps(profiler, "grpo", [3])
    assert traced_steps(tmp_path) == [("grpo", 1), ("grpo", 2)]


def test_closing_a_stage_before_the_window_keeps_the_window(tmp_path):
    """The loop closes the profiler after each stage: the SFT stage's close leaves the GRPO window to come."""
    profiler = profiling.Profiler(profile_config(stage="grpo", start_step=1, num_steps=1), str(tmp_path),
                                  log=lambda _: None)
    run_steps(profiler, "sft", [1, 2])
    profiler.close()
    run_steps(profiler, "grpo", [1, 2])
    assert traced_steps(tmp_path) == [("grpo", 1)]


def test_no_trace_by_default(tmp_path):
    profiler = profiling.Profiler(profiling.get_profile_config(), str(tmp_path), log=lambda _: None)
    run_steps(profiler, "grpo", [1, 2, 3])
    assert not os.path.exists(tmp_path / "profile")


@pytest.mark.parametrize("overrides,message", [
    ({"stage": "rl"}, "profile.stage='rl'"), ({"start_step": 0}, "profile.start_step=0"),
    ({"num_steps": -1}, "num_steps=-1"), ({"chip": "v9"}, "profile.chip='v9'; expected 'auto', 'none' or one of"),
])
def test_bad_settings_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        profiling.Profiler(profile_config(**overrides), str(tmp_path), log=lambda _: None)


# ------------------------------------------------------------------------------------------------- the figures
def test_resolve_chip():
    assert profiling.resolve_chip("auto", "TPU v5 lite") is chips.CHIPS["v5e"]
    assert profiling.resolve_chip("auto", "cpu") is None
    assert profiling.resolve_chip("v6e", "cpu") is chips.CHIPS["v6e"]
    assert profiling.resolve_chip("none", "TPU v4") is None


@pytest.fixture(scope="module")
def vl_model():
    """A tiny random Qwen2.5-VL (untied head, so the decode weights are the layers' and the head's)."""
    return tiny.init_model(tiny.hf_config("qwen2_5_vl", 300, text_shape={"tie_word_embeddings": False}))


def vl_batch():
    """Two prompts of different lengths, one with two images (grids as the processor gives them)."""
    grids = np.array([[1, 4, 4], [1, 8, 4]])
    return [types.SimpleNamespace(prompt_ids=tuple(range(40)), images={"image_grid_thw": grids},
                                  target_ids=tuple(range(12))),
            types.SimpleNamespace(prompt_ids=tuple(range(25)), images=None, target_ids=tuple(range(7)))]


GRPO_METRICS = {"completion_length": 10.0, "time/rollout": 0.5, "time/reward": 0.1, "time/logprobs": 0.2,
                "time/update": 0.7, "time/data": 30.0}  # the data wait is not the step's


def vl_trainer_config(*, frozen_tower: bool = True, **grpo):
    config = helpers.trainer_config(num_generations=4, **grpo)
    config.optimizer.compute_dtype = "bfloat16"
    config.optimizer.param_rules = ((r"visual/.*", "frozen"),) if frozen_tower else ()
    return config


def grpo_figures(model, config, *, chip="v5e", mesh=None, metrics=GRPO_METRICS, stage="grpo"):
    profiler = profiling.Profiler(profile_config(chip=chip), "/unused", devices=jax.devices()[:4], mesh=mesh,
                                  log=lambda _: None)
    profiler.start_stage(stage, model, config)
    return profiler.figures(stage, vl_batch(), metrics)


def test_grpo_figures_against_the_chip_table(vl_model):
    out = grpo_figures(vl_model, vl_trainer_config(beta=0.04))
    v5e = chips.CHIPS["v5e"]
    assert out["perf/mfu"] == pytest.approx(out["perf/flops"] / (1.5 * 4 * v5e.peak_bf16_flops))
    rows = 2 * 4
    assert out["perf/rollout_tokens_per_second"] == pytest.approx(10.0 * rows / 0.5)
    # decode reads every decoder matmul weight and the LM head once per step, in bfloat16
    lm = vl_model.language_model
    weights = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(lm, nnx.Param))
                  if jax.tree_util.keystr(path).endswith("_proj'].value")) + lm.lm_head.value.size
    assert out["perf/rollout_ceiling_tokens_per_second"] == pytest.approx(v5e.hbm_bandwidth * rows / (2 * weights))
    assert out["perf/rollout_roofline_fraction"] == pytest.approx(
        out["perf/rollout_tokens_per_second"] / out["perf/rollout_ceiling_tokens_per_second"])


def test_grpo_flops_are_each_prompt_at_its_own_length_and_images(vl_model):
    out = grpo_figures(vl_model, vl_trainer_config(beta=0.04))
    cfg = vl_model.config
    expected = sum(
        parts.total
        for prompt_length, grids in ((40, [(1, 4, 4), (1, 8, 4)]), (25, []))
        for parts in flops.grpo_step(cfg, 1, 4, prompt_length, 10, beta=0.04, grids=grids).values())
    assert out["perf/flops"] == pytest.approx(expected)
    without_reference = grpo_figures(vl_model, vl_trainer_config(beta=0.0))["perf/flops"]
    reference = sum(flops.completion_logprobs(cfg, 1, 4, p, 10).total for p in (40, 25))
    assert out["perf/flops"] - without_reference == pytest.approx(reference)


def test_a_trained_tower_and_lora_change_the_flops(vl_model):
    frozen = grpo_figures(vl_model, vl_trainer_config())["perf/flops"]
    trained = grpo_figures(vl_model, vl_trainer_config(frozen_tower=False))["perf/flops"]
    tower = flops.vision_forward(vl_model.config.vision, [(1, 4, 4), (1, 8, 4)]).total
    assert trained > frozen + 2 * tower  # the update recomputes the tower and runs its backward
    adapted = lora.apply(nnx.clone(vl_model), rank=2, alpha=4.0)
    assert grpo_figures(adapted, vl_trainer_config())["perf/flops"] < frozen  # frozen base: no weight gradients


def test_sft_flops_use_each_target_length(vl_model):
    out = grpo_figures(vl_model, vl_trainer_config(), stage="sft", metrics={"time/update": 0.25, "time/data": 1.0})
    cfg = vl_model.config
    grids = [(1, 4, 4), (1, 8, 4)]
    expected = (flops.grpo_update(cfg, 1, 1, 40, 12, grids=grids).total + flops.vision_forward(cfg.vision, grids).total
                + flops.grpo_update(cfg, 1, 1, 25, 7).total)
    assert out["perf/flops"] == pytest.approx(expected)
    assert out["perf/mfu"] == pytest.approx(expected / (0.25 * 4 * chips.CHIPS["v5e"].peak_bf16_flops))
    assert not any(key.startswith("perf/rollout") for key in out)


def test_tensor_parallel_decode_reads_a_shard_of_the_weights(vl_model):
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"))
    single = grpo_figures(vl_model, vl_trainer_config())
    sharded = grpo_figures(vl_model, vl_trainer_config(), mesh=mesh)
    assert sharded["perf/rollout_ceiling_tokens_per_second"] == pytest.approx(
        2 * single["perf/rollout_ceiling_tokens_per_second"])


def test_on_cpu_mfu_and_roofline_are_not_logged_and_that_is_said_once(vl_model):
    logs = []
    profiler = profiling.Profiler(profiling.get_profile_config(), "/unused", log=logs.append)
    profiler.start_stage("grpo", vl_model, vl_trainer_config())
    for _ in range(3):
        out = profiler.figures("grpo", vl_batch(), GRPO_METRICS)
    assert set(out) == {"perf/flops", "perf/rollout_tokens_per_second"}
    assert len(logs) == 1 and "no MFU or rollout roofline" in logs[0] and "'cpu'" in logs[0]


def test_figures_need_their_stage_started(vl_model):
    profiler = profiling.Profiler(profiling.get_profile_config(), "/unused", log=lambda _: None)
    with pytest.raises(ValueError, match=r"no start_stage\('sft'"):
        profiler.figures("sft", vl_batch(), {"time/update": 1.0})
