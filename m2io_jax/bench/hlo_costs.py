"""Matmul FLOPs and collectives of an optimised HLO module, with loop trip counts (for the compile report).

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip count (checked on a v5e
topology: a 10-layer `lax.scan` reports the FLOPs of one layer), so for scanned models its FLOPs and
`optimal_seconds` cover one layer. This module reads `compiled.as_text()` instead and counts:

- `dot` FLOPs: 2 x output elements x the product of the contracting dimensions; `convolution` (how TPU HLO
  writes most matmuls, some as padded and dilated windows): 2 x input features per group x the non-spatial
  output elements x, per spatial dimension, the (output position, window tap) pairs that read a real input
  element (not padding, not a hole of lhs dilation), as XLA's own cost analysis counts them;
- each computation as often as it runs: fusions and calls once, a `while` body times its trip count, read from
  its condition (`counter < constant`, the loop `lax.scan` and `lax.map` build, counting from 0); a loop whose
  condition is anything else (the sampler's early-exit loop) counts once and is reported in `unknown_loops`;
  a `conditional` counts its costliest branch (an upper bound: the vision tower's per-layer cond runs the
  cheaper window branch in most layers);
- collectives by kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute, with their
  async -start forms), in the HLO text (`static`) and as executed with the same multipliers (`executed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from typing import Any

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z0-9]+\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_ARRAYS = re.compile(r"\b(pred|[sufc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "bf16": 2}
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: tuple[int, ...] | None  # None for tuples and tokens
    opcode: str
    rest: str  # operands and attributes, as printed
    nbytes: int = 0  # of the result (all elements of a tuple)

    @property
    def operands(self) -> list[str]:
        depth, end = 1, 0
        for end, ch in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        return _OPERAND.findall(self.rest[:end])

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s]+)", self.rest)
        return None if match is None else match.group(1)


@dataclasses.dataclass(frozen=True)
class HloCosts:
    """Trip-count-aware matmul FLOPs (per device), collectives, and the loops whose trip count is unknown."""

    flops: float
    seconds: float  # the roofline time: every scheduled op at max(FLOPs / peak, HBM bytes / bandwidth), summed
    collectives_static: dict[str, int]
    collectives_executed: dict[str, float]
    unknown_loops: int
    trip_counts: tuple[int, ...]  # of the loops whose count was read, in order of appearance
    unknown_loop_seconds: tuple[float, ...] = ()  # roofline time of one iteration of each unknown-count loop


def _nbytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAYS.findall(type_text):
        size = _ITEMSIZE.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_text: str) -> tuple[int, ...] | None:
    match = _ARRAY.match(type_text.strip())
    if match is None:
        return None
    return tuple(int(d) for d in match.group(1).split(",") if d)


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations of an HLO module by name, and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            name, type_text, opcode, rest = instruction.groups()
            computations[current].append(Instruction(name, _dims(type_text), opcode, rest, _nbytes(type_text)))
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def matmul_flops(instruction: Instruction, shapes: dict[str, tuple[int, ...] | None]) -> float:
    """FLOPs of one dot or convolution (0 for anything else, or when a shape is unknown)."""
    if instruction.shape is None or instruction.opcode not in ("dot", "convolution"):
        return 0.0
    operands = [shapes.get(name) for name in instruction.operands[:2]]
    if any(shape is None for shape in operands):
        return 0.0
    lhs, rhs = operands
    out = math.prod(instruction.shape)
    if instruction.opcode == "dot":
        contracting = instruction.attribute("lhs_contracting_dims") or "{}"
        return 2.0 * out * math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting))
    labels = instruction.attribute("dim_labels")
    if labels is None:
        return 0.0
    lhs_labels, rest = labels.split("_", 1)
    rhs_labels, out_labels = rest.split("->")
    window = _window(instruction.rest)
    flops = 2.0 * rhs[rhs_labels.index("i")] * math.prod(
        size for size, label in zip(instruction.shape, out_labels) if not label.isdigit())
    for k in range(sum(label.isdigit() for label in rhs_labels)):
        flops *= _valid_taps(lhs[lhs_labels.index(str(k))], instruction.shape[out_labels.index(str(k))],
                             rhs[rhs_labels.index(str(k))], **{key: values[k] for key, values in window.items()})
    return flops


def _window(rest: str) -> dict[str, list[Any]]:
    """A convolution's `window={size=.. pad=lo_hi.. stride=.. lhs_dilate=.. rhs_dilate=..}`, per spatial dim."""
    match = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(item.split("=", 1) for item in match.group(1).split()) if match else {}
    out: dict[str, list[Any]] = {}
    if "pad" in fields:
        out["pad"] = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")]
    for key in ("stride", "lhs_dilate", "rhs_dilate"):
        if key in fields:
            out[key] = [int(v) for v in fields[key].split("x")]
    return out


def _valid_taps(size_in: int, size_out: int, size_window: int, pad: tuple[int, int] = (0, 0), stride: int = 1,
                lhs_dilate: int = 1, rhs_dilate: int = 1) -> int:
    """(output position, window tap) pairs of one spatial dimension that read a real input element (not padding,
    not a hole of lhs dilation): the multiply-adds XLA performs along it."""
    positions = np.arange(size_out) * stride - pad[0]
    dilated = (size_in - 1) * lhs_dilate + 1
    total = 0
    for tap in range(size_window):
        index = positions + tap * rhs_dilate
        total += int(np.count_nonzero((index >= 0) & (index < dilated) & (index % lhs_dilate == 0)))
    return total


def trip_count(condition: list[Instruction]) -> int | None:
    """N for a loop condition `counter < N` (counter a tuple element, N a constant), else None."""
    constants = {}
    for instruction in condition:
        if instruction.opcode == "constant":
            value = re.match(r"\s*(-?\d+)\)", instruction.rest)
            if value:
                constants[instruction.name] = int(value.group(1))
    root = condition[-1] if condition else None
    if root is None or root.opcode != "compare" or root.attribute("direction") != "LT":
        return None
    operands = root.operands
    if len(operands) == 2 and operands[1] in constants and operands[0] not in constants:
        return constants[operands[1]]
    return None


def _moves_memory(instruction: Instruction) -> bool:
    """Whether a scheduled op reads and writes HBM in the roofline (not bookkeeping, not communication)."""
    if instruction.opcode in _NO_TRAFFIC or instruction.opcode.removesuffix("-start") in COLLECTIVES:
        return False
    if instruction.opcode.endswith("-done"):
        return False
    target = instruction.attribute("custom_call_target") or ""
    return not (instruction.opcode == "custom-call" and ("Collective" in target or target == '"AllocateBuffer"'))


def _traffic(instruction: Instruction, sizes: dict[str, int], computations: dict[str, list[Instruction]]) -> int:
    """HBM bytes a scheduled op reads and writes: its operands and result, except that an operand only sliced
    (dynamic-slice, slice) reads just the slices, and an in-place dynamic-update-slice writes just the update
    (the stacked layer weights and KV caches of a scanned model are read and written a layer at a time)."""
    operands = instruction.operands
    if instruction.opcode == "dynamic-update-slice":
        return 2 * sizes.get(operands[1], 0) if len(operands) > 1 else instruction.nbytes
    if instruction.opcode in ("dynamic-slice", "slice"):
        return 2 * instruction.nbytes
    called = _OPERAND.findall(instruction.attribute("calls") or "") if instruction.opcode == "fusion" else []
    if not called or called[0] not in computations:
        return instruction.nbytes + sum(sizes.get(o, 0) for o in operands)
    body = computations[called[0]]
    inner = {i.name: i.nbytes for i in body}
    total = 0
    for index, operand in enumerate(operands):
        read = _bytes_read(computations, called[0], index)
        total += sizes.get(operand, 0) if read is None else read
    root = body[-1] if body else None
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        return total + inner.get(root.operands[1], 0)
    return total + instruction.nbytes


def _bytes_read(computations: dict[str, list[Instruction]], name: str, index: int) -> int | None:
    """Bytes a fused computation reads of its parameter `index` when it only slices it (through nested fusions)
    or only updates it in place (0); None when it reads all of it."""
    body = computations.get(name, [])
    param = next((i.name for i in body if i.opcode == "parameter" and re.match(rf"\s*{index}\)", i.rest)), None)
    uses = [(i, position) for i in body for position, operand in enumerate(i.operands) if operand == param]
    if param is None or not uses:
        return None
    total = 0
    for user, position in uses:
        if user.opcode in ("dynamic-slice", "slice") and position == 0:
            total += user.nbytes
        elif user.opcode == "dynamic-update-slice" and position == 0:
            continue
        elif user.opcode == "fusion":
            nested = _OPERAND.findall(user.attribute("calls") or "")
            read = _bytes_read(computations, nested[0], position) if nested else None
            if read is None:
                return None
            total += read
        else:
            return None
    return total


def analyse(hlo_text: str, peak_flops: float = 1.0, hbm_bandwidth: float = 1.0) -> HloCosts:
    """`HloCosts` of an optimised HLO module (`compiled.as_text()`); `seconds` uses the device's peak FLOP/s and
    HBM bytes/s. Scheduled ops (of the entry, loop bodies, branches) cost max(their FLOPs, those of the fusion
    they call, / peak; their operands' and result's bytes / bandwidth); communication is left out (overlapped)."""
    computations, entry = parse(hlo_text)
    static = Counter()
    unknown: list[int] = []
    trips: list[int] = []
    iteration_seconds: dict[str, float] = {}

    @functools.lru_cache(maxsize=None)
    def cost(name: str, scheduled: bool) -> tuple[float, float, tuple[tuple[str, float], ...]]:
        instructions = computations.get(name, [])
        shapes = {i.name: i.shape for i in instructions}
        sizes = {i.name: i.nbytes for i in instructions}
        flops = seconds = 0.0
        collectives = Counter()
        for instruction in instructions:
            own = matmul_flops(instruction, shapes)
            kind = instruction.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                collectives[kind] += 1
            inner_seconds = 0.0
            if instruction.opcode == "while":
                body, condition = instruction.attribute("body"), instruction.attribute("condition")
                n = trip_count(computations.get(condition.lstrip("%"), [])) if condition else None
                (trips if n is not None else unknown).append(n or 1)
                callees = [(body.lstrip("%"), n or 1, True)]
                if n is None:
                    iteration_seconds[body.lstrip("%")] = cost(body.lstrip("%"), True)[1]
            elif instruction.opcode == "conditional":
                branches = _OPERAND.findall(instruction.attribute("branch_computations") or "")
                branches += [b.lstrip("%") for b in (instruction.attribute("true_computation"),
                                                     instruction.attribute("false_computation")) if b]
                callees = [(max(branches, key=lambda b: cost(b, True)[1]), 1, True)] if branches else []
            else:
                callees = [(callee, 1, instruction.opcode == "call") for key in ("calls", "called_computations")
                           for callee in _OPERAND.findall(instruction.attribute(key) or "")]
            for callee, times, callee_scheduled in callees:
                sub_flops, sub_seconds, sub_collectives = cost(callee, callee_scheduled)
                own += times * sub_flops
                inner_seconds += times * sub_seconds
                for name_, count in sub_collectives:
                    collectives[name_] += times * count
            flops += own
            if not scheduled:
                continue
            if any(callee_scheduled for _, _, callee_scheduled in callees):
                seconds += inner_seconds  # a loop, branch or call: its own ops are timed where they are
            else:
                traffic = _traffic(instruction, sizes, computations) if _moves_memory(instruction) else 0
                seconds += max(own / peak_flops, traffic / hbm_bandwidth)
        return flops, seconds, tuple(sorted(collectives.items()))

    for instructions in computations.values():
        for instruction in instructions:
            kind = instruction.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                static[kind] += 1
    flops, seconds, executed = cost(entry, True)
    return HloCosts(flops=flops, seconds=seconds, collectives_static=dict(static),
                    collectives_executed=dict(executed), unknown_loops=len(unknown), trip_counts=tuple(trips),
                    unknown_loop_seconds=tuple(iteration_seconds.values()))
