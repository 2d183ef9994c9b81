"""TPU generations: peak bf16 FLOP/s, HBM capacity and bandwidth per chip, and how their chips appear as devices.

The one table that MFU, roofline and memory figures divide by (the compile report `m2io_jax.bench.aot`, the
profiler's per-step MFU). Figures are Google's published per-chip numbers (cloud.google.com/tpu/docs/v4, v5e,
v5p, v6e):

| chip | device_kind     | bf16 peak     | HBM     | HBM bandwidth | TensorCores | devices per chip on a VM |
|------|-----------------|---------------|---------|---------------|-------------|--------------------------|
| v4   | "TPU v4"        | 275 TFLOP/s   | 32 GiB  | 1200 GB/s     | 2           | 1 (megacore)             |
| v5e  | "TPU v5 lite"   | 197 TFLOP/s   | 16 GiB  | 819 GB/s      | 1           | 1                        |
| v5p  | "TPU v5"        | 459 TFLOP/s   | 95 GiB  | 2765 GB/s     | 2           | 1 (megacore)             |
| v6e  | "TPU v6 lite"   | 918 TFLOP/s   | 32 GiB  | 1640 GB/s     | 1           | 1                        |

Megacore: on a v4 or v5p VM one JAX device is one chip (its two TensorCores run one program), so per-device
memory and FLOP/s are per chip. `jax.experimental.topologies.get_topology_desc` follows the plugin's default chip
config instead, which for v4 is one device per TensorCore: "v4:2x2x1" reports 8 devices with half a chip's HBM
each, unlike the 4 devices of a v4-8 VM. Passing `chip_config_name="megacore"` (`Chip.topology_kwargs`) gives the
VM's layout; v5p's default already is megacore ("v5p:2x2x1" reports 4 devices of 2 cores). v5e and v6e have
one TensorCore per chip.

Anything else (CPU, GPU, an unknown TPU) has no entry: `chip_for` returns None and callers skip the figure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip figures and device layout."""

    name: str  # "v5e": the prefix of its topology names ("v5e:2x4")
    device_kinds: tuple[str, ...]  # what `jax.Device.device_kind` says on this chip
    peak_bf16_flops: float  # FLOP/s of one chip, bfloat16 matmuls
    hbm_bytes: int  # HBM of one chip
    hbm_bandwidth: float  # bytes/s of one chip
    tensorcores: int  # TensorCores per chip
    megacore: bool  # a VM runs one device per chip over its two TensorCores

    @property
    def devices_per_chip_on_topology(self) -> int:
        """Devices per chip that `get_topology_desc` reports without `topology_kwargs` (v4: one per TensorCore)."""
        return self.tensorcores if self.name == "v4" else 1

    @property
    def topology_kwargs(self) -> dict[str, Any]:
        """Extra `get_topology_desc` arguments that give the layout a VM gives: one device per chip."""
        return {"chip_config_name": "megacore"} if self.megacore else {}

    def hbm_per_device(self, devices_per_chip: int = 1) -> int:
        """HBM bytes one device may use when each chip runs `devices_per_chip` devices."""
        return self.hbm_bytes // devices_per_chip

    def peak_flops_per_device(self, devices_per_chip: int = 1) -> float:
        """Peak bf16 FLOP/s of one device when each chip runs `devices_per_chip` devices."""
        return self.peak_bf16_flops / devices_per_chip

    def hbm_bandwidth_per_device(self, devices_per_chip: int = 1) -> float:
        """HBM bytes/s of one device when each chip runs `devices_per_chip` devices."""
        return self.hbm_bandwidth / devices_per_chip


CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("v4", ("TPU v4",), 275e12, 32 * GIB, 1200e9, tensorcores=2, megacore=True),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 819e9, tensorcores=1, megacore=False),
    Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GIB, 2765e9, tensorcores=2, megacore=True),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 1640e9, tensorcores=1, megacore=False),
)}


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose `device_kind` this is (case-insensitive), or None for CPU, GPU and unknown kinds."""
    wanted = device_kind.strip().lower()
    for chip in CHIPS.values():
        if wanted in (kind.lower() for kind in chip.device_kinds):
            return chip
    return None


def chip_of_topology(topology_name: str) -> Chip:
    """The chip of a topology name such as "v5e:2x4"; ValueError naming the known prefixes otherwise."""
    prefix = topology_name.split(":", 1)[0].strip().lower()
    if prefix not in CHIPS:
        raise ValueError(f"topology {topology_name!r}: unknown chip {prefix!r}; expected one of {sorted(CHIPS)} "
                         f"followed by ':<shape>', e.g. 'v5e:2x4'")
    return CHIPS[prefix]
