"""The TPU chip table: device kinds, per-device figures under megacore, and the topology layouts it claims."""

import os

import pytest

from m2io_jax import chips

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another test process may hold libtpu: compiling only


@pytest.mark.parametrize("kind, name", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("tpu v5e", "v5e"),
                                        ("TPU v5", "v5p"), ("TPU v6 lite", "v6e")])
def test_chip_for_known_device_kinds(kind, name):
    assert chips.chip_for(kind).name == name


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 80GB HBM3", "TPU v7", ""])
def test_chip_for_unknown_kinds_is_none(kind):
    assert chips.chip_for(kind) is None


def test_chip_of_topology_and_its_error():
    assert chips.chip_of_topology("v5e:2x4").name == "v5e"
    assert chips.chip_of_topology("v4:2x2x1").name == "v4"
    with pytest.raises(ValueError, match="v9x.*expected one of"):
        chips.chip_of_topology("v9x:2x2")


def test_per_device_figures_split_a_chip():
    v4 = chips.CHIPS["v4"]
    assert v4.hbm_per_device(2) * 2 == v4.hbm_bytes
    assert v4.peak_flops_per_device(v4.devices_per_chip_on_topology) == v4.peak_bf16_flops / 2
    v5e = chips.CHIPS["v5e"]
    assert v5e.hbm_per_device() == 16 * chips.GIB and v5e.devices_per_chip_on_topology == 1


def test_megacore_chips_ask_the_topology_for_one_device_per_chip():
    assert chips.CHIPS["v4"].topology_kwargs == {"chip_config_name": "megacore"}
    assert chips.CHIPS["v5e"].topology_kwargs == {}


@pytest.mark.slow
@pytest.mark.parametrize("topology, devices_default, devices_vm", [("v4:2x2x1", 8, 4), ("v5p:2x2x1", 4, 4),
                                                                    ("v5e:2x2", 4, 4), ("v6e:2x2", 4, 4)])
def test_topology_layouts_match_the_table(topology, devices_default, devices_vm):
    """What the docstring claims of `get_topology_desc` (needs libtpu, the `tpu` extra: fails without it)."""
    from jax.experimental import topologies

    chip = chips.chip_of_topology(topology)
    default = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    vm = topologies.get_topology_desc(platform="tpu", topology_name=topology, **chip.topology_kwargs).devices
    assert len(default) == devices_default
    assert len(default) == 4 * chip.devices_per_chip_on_topology
    assert len(vm) == devices_vm
    assert chips.chip_for(vm[0].device_kind) is chip
