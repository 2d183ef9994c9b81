"""The TPU compile report: its HLO reader (on hand-written and CPU-compiled HLO) and, with libtpu, a report on a
small Qwen2.5-VL compiled for a v5e:2x2 topology whose FLOPs agree with the analytic count.

The report tests are `slow` and need the `tpu` extra (libtpu): without it they fail, never skip.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from m2io_jax import chips, cli
from m2io_jax import sharding as shd
from m2io_jax.bench import aot, hlo_costs
from m2io_jax.models import tiny

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another test process may hold libtpu: compiling only
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOP_HLO = """HloModule loop

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16] get-tuple-element(%p), index=1
  %w = f32[16,16] constant({...})
  %y = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[8,16] all-gather(%y), dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %g)
}

%cond (p.1: (s32[], f32[8,16])) -> pred[] {
  %p.1 = (s32[], f32[8,16]) parameter(0)
  %limit = s32[] constant(12)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

ENTRY %main (x.1: f32[8,16]) -> f32[8,16] {
  %x.1 = f32[8,16] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]) tuple(%zero, %x.1)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16] get-tuple-element(%loop), index=1
}
"""


def test_hlo_costs_multiply_a_loop_body_by_its_trip_count():
    costs = hlo_costs.analyse(LOOP_HLO)
    assert costs.trip_counts == (12,) and costs.unknown_loops == 0
    assert costs.flops == 12 * 2 * 8 * 16 * 16
    assert costs.collectives_static == {"all-gather": 1}
    assert costs.collectives_executed == {"all-gather": 12}


SLICED_HLO = """HloModule sliced

%slice_layer (w.1: f32[12,16,16], i.2: s32[]) -> f32[16,16] {
  %w.1 = f32[12,16,16] parameter(0)
  %i.2 = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  %ds = f32[1,16,16] dynamic-slice(%w.1, %i.2, %zero.1, %zero.1), dynamic_slice_sizes={1,16,16}
  ROOT %b = f32[16,16] bitcast(%ds)
}

%layer (x.2: f32[8,16], w.2: f32[12,16,16], i.3: s32[]) -> f32[8,16] {
  %x.2 = f32[8,16] parameter(0)
  %w.2 = f32[12,16,16] parameter(1)
  %i.3 = s32[] parameter(2)
  %wi = f32[16,16] fusion(%w.2, %i.3), kind=kLoop, calls=%slice_layer
  ROOT %y = f32[8,16] dot(%x.2, %wi), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[8,16], f32[12,16,16])) -> (s32[], f32[8,16], f32[12,16,16]) {
  %p = (s32[], f32[8,16], f32[12,16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16] get-tuple-element(%p), index=1
  %w = f32[12,16,16] get-tuple-element(%p), index=2
  %y.1 = f32[8,16] fusion(%x, %w, %i), kind=kOutput, calls=%layer
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16], f32[12,16,16]) tuple(%next, %y.1, %w)
}

%cond (p.1: (s32[], f32[8,16], f32[12,16,16])) -> pred[] {
  %p.1 = (s32[], f32[8,16], f32[12,16,16]) parameter(0)
  %limit = s32[] constant(12)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

ENTRY %main (x.1: f32[8,16], w.0: f32[12,16,16]) -> f32[8,16] {
  %x.1 = f32[8,16] parameter(0)
  %w.0 = f32[12,16,16] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16], f32[12,16,16]) tuple(%zero, %x.1, %w.0)
  %loop = (s32[], f32[8,16], f32[12,16,16]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16] get-tuple-element(%loop), index=1
}
"""


def test_hlo_roofline_reads_one_layer_of_stacked_weights_per_step():
    """The fused matmul reads x, one [16, 16] slice of the stacked weights (not all 12 layers) and the counter,
    and writes y; the loop's add reads and writes 3 scalars: bytes-bound at 1 byte/s, FLOP-bound at 1 FLOP/s."""
    per_step_bytes = (8 * 16 + 16 * 16 + 1 + 8 * 16) * 4 + 3 * 4
    costs = hlo_costs.analyse(SLICED_HLO, peak_flops=1e30, hbm_bandwidth=1.0)
    assert costs.seconds == pytest.approx(12 * per_step_bytes)
    assert hlo_costs.analyse(SLICED_HLO, peak_flops=1.0, hbm_bandwidth=1e30).seconds == pytest.approx(
        12 * 2 * 8 * 16 * 16)


def test_hlo_costs_read_an_unknown_loop_once():
    costs = hlo_costs.analyse(LOOP_HLO.replace("direction=LT", "direction=NE"))
    assert costs.unknown_loops == 1 and costs.flops == 2 * 8 * 16 * 16


@pytest.mark.parametrize("padding, lhs_dilation, stride", [((0, 0), 1, 1), ((3, 2), 1, 1), ((2, 2), 2, 1),
                                                           ((1, 0), 1, 2)])
def test_convolution_flops_match_xla_with_padding_and_dilation(padding, lhs_dilation, stride):
    """The valid-tap count of a padded, dilated, strided convolution equals XLA:CPU's own FLOP count of it."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, window_strides=(stride,), padding=(padding,),
                                            lhs_dilation=(lhs_dilation,), dimension_numbers=("NWC", "WIO", "NWC"))

    x, k = jnp.zeros((2, 17, 8)), jnp.zeros((5, 8, 4))
    compiled = jax.jit(conv).lower(x, k).compile()
    counted = hlo_costs.analyse(compiled.as_text()).flops
    assert counted > 0
    assert counted == pytest.approx(compiled.cost_analysis()["flops"], rel=0.05)


def tiny_config(layers: int, remat: str):
    """configs/tpu/base.py's GRPO config on v5e:2x2 with a small Qwen2.5-VL: `layers` decoder layers, one
    full-attention vision block (per `layers`), 4 prompts of 128 tokens with one 112-px image each, 32 new tokens."""
    spec = importlib.util.spec_from_file_location("tpu_base", os.path.join(REPO, "configs", "tpu", "base.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.inserter_grpo("v5e:2x2", mesh={"fsdp": 2, "tensor": 2}, batch_size=4, micro_batch_prompts=2,
                           prompt_length=128, images_per_prompt=1, remat=remat)
    c.tpu.model = tiny.hf_config("qwen2_5_vl", 1024, text_shape=dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2), vision_shape=dict(depth=layers, hidden_size=64, intermediate_size=128, num_heads=2,
                                                  fullatt_block_indexes=list(range(layers))))
    c.tpu.image_grid = (1, 8, 8)
    c.rollout.max_new_tokens = 32
    return c


def within(analytic: float, counted: float, tolerance: float = 0.1) -> bool:
    return abs(analytic - counted) <= tolerance * counted


@pytest.mark.slow
def test_one_layer_update_flops_match_cost_analysis():
    """Every loop of length one: XLA's own cost_analysis counts the whole update, and agrees with flops.py."""
    result = aot.report(tiny_config(layers=1, remat="none"))
    update = result["programs"]["grpo_gradients"]
    assert within(update["analytic_flops"], update["xla_flops"]), update
    assert result["fits"] is True and result["chip"] == "v5e" and result["devices"] == 4


@pytest.mark.slow
def test_report_command_on_a_scanned_model(tmp_path, monkeypatch, capsys):
    """Two layers, full remat: cost_analysis counts one layer, the HLO count all of them, and it agrees with the
    analytic count; the command prints its JSON last and exits 1 when the chip's HBM is too small."""
    config = tmp_path / "tiny_tpu.py"
    config.write_text("import sys\n"
                      f"sys.path.insert(0, {os.path.join(REPO, 'tests', 'bench')!r})\n"
                      "from test_aot import tiny_config\n\n\n"
                      "def get_config():\n    return tiny_config(layers=2, remat='full')\n")
    monkeypatch.setitem(chips.CHIPS, "v5e", dataclasses.replace(chips.CHIPS["v5e"], hbm_bytes=8 * 2 ** 20))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(aot.main, ["aot", f"--config={config}"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fits"] is False and "does not fit" in result["fit_message"]
    programs = result["programs"]
    for name in ("grpo_gradients", "reference_logprobs", "rollout_prefill", "decode_step"):
        figures = programs[name]
        assert within(figures["analytic_flops"], figures["hlo_flops"]), (name, figures)
        assert figures["xla_flops"] < 0.8 * figures["hlo_flops"], (name, figures)  # loop bodies counted once
    assert programs["grpo_gradients"]["collectives_executed"].get("all-gather", 0) > 0  # fsdp gathers weights
    assert within(result["update"]["analytic_flops"], result["update"]["hlo_flops"])
    assert 0 < result["update"]["mfu"] < 1 and 0 < result["decode_step"]["fraction_of_roofline"] < 1
    assert set(result["resident_bytes"]) == {"parameters", "optimizer", "gradient accumulator", "sampler weights",
                                             "reference", "KV cache"}
    assert "encode_vision" in programs and programs["rollout_decode"]["unknown_loops"] >= 1


@pytest.mark.slow
def test_every_tpu_config_loads_and_names_a_known_topology():
    for name in sorted(os.listdir(os.path.join(REPO, "configs", "tpu"))):
        if name == "base.py" or not name.endswith(".py"):
            continue
        config = cli.load_config(os.path.join(REPO, "configs", "tpu", name))
        devices, chip = aot.topology_devices(config.tpu)
        assert chip is chips.chip_for(devices[0].device_kind), name
        assert shd.make_mesh(config.mesh.to_dict(), devices).size == len(devices), name
        assert "topology" in config.tpu and aot.model_config(config).num_parameters > 3e9, name
