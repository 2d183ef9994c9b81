"""Hugging Face safetensors checkpoints in and out, tensor by tensor, straight into sharded arrays.

A model port describes its checkpoint layout as a list of `TensorSpec`s: which parameter of ours (a path in
`nnx.state`) is stored under which Hugging Face name, with which per-tensor transform (transpose, split heads).
Layer-stacked parameters name a `{layer}` template and are assembled from one tensor per layer. A spec flagged
`optional` may be absent from a checkpoint (the parameter then loads as zeros), and the loader accepts the
checkpoint keys under any of a list of prefixes (exports of one architecture differ: `bert.`, `roberta.`, none).

Loading validates every name, shape and dtype against the checkpoint header before a single array is
allocated, so a bad checkpoint raises with the file and tensor named and no half-loaded model exists. Arrays
are then created with `jax.make_array_from_callback`: each device reads only the layers and slices of its own
shard from memory-mapped files (bfloat16 included, which numpy-framework safetensors readers lack).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from m2io_jax import sharding as shd

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODE_OF = {v: k for k, v in SAFETENSORS_DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(w: np.ndarray) -> np.ndarray:
    """HF linear weight [out, in] <-> ours [in, out] (its own inverse)."""
    return w.T


def split_heads_in(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF query/key/value weight [heads*head_dim, D] -> ours [D, heads, head_dim]."""
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def merge_heads_in(w: np.ndarray) -> np.ndarray:
    """Ours [D, heads, head_dim] -> HF [heads*head_dim, D] (inverse of split_heads_in)."""
    return w.reshape(w.shape[0], -1).T


def split_heads_out(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF attention output weight [D, heads*head_dim] -> ours [heads, head_dim, D]."""
    return lambda w: w.T.reshape(heads, head_dim, w.shape[0])


def merge_heads_out(w: np.ndarray) -> np.ndarray:
    """Ours [heads, head_dim, D] -> HF [D, heads*head_dim] (inverse of split_heads_out)."""
    return w.reshape(-1, w.shape[-1]).T


def split_heads_bias(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF projection bias [heads*head_dim] -> ours [heads, head_dim]."""
    return lambda b: b.reshape(heads, head_dim)


def merge_heads_bias(b: np.ndarray) -> np.ndarray:
    """Ours [heads, head_dim] -> HF [heads*head_dim] (inverse of split_heads_bias)."""
    return b.reshape(-1)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one parameter of ours lives in a Hugging Face checkpoint.

    Attributes:
      path: the parameter's key path in `nnx.state(model)`, e.g. ("layers", "q_proj").
      hf_name: the checkpoint tensor name; contains "{layer}" when the parameter is stacked over layers.
      hf_shape: the checkpoint tensor's shape (per layer when stacked).
      to_ours: maps one checkpoint tensor to our per-layer layout.
      to_hf: the inverse of to_ours.
      num_layers: number of stacked layers (None: not stacked).
      optional: the checkpoint may lack the tensor (e.g. the pooler that sentence-transformers exports drop);
        the parameter then loads as zeros. A present optional tensor is validated like any other; saving
        always writes it.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] = identity
    to_hf: Callable[[np.ndarray], np.ndarray] = identity
    num_layers: int | None = None
    optional: bool = False

    def names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(layer=i) for i in range(self.num_layers)]


class SafetensorsCheckpoint:
    """Read-only view of the safetensors files of a checkpoint directory (single file or sharded with index)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                if tensor != "__metadata__":
                    self._entries[tensor] = (path, info, data_start)
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def file_of(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype_code(self, name: str) -> str:
        return self._entries[name][1]["dtype"]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (no copy until sliced or cast)."""
        path, info, data_start = self._entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][data_start + begin:data_start + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        size = int.from_bytes(prefix, "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    return header, 8 + size


def _flat_variables(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def detect_prefix(checkpoint: SafetensorsCheckpoint, specs: Sequence[TensorSpec], prefixes: Sequence[str]) -> str:
    """The first of `prefixes` under which the checkpoint holds the first required tensor of `specs`.

    Exports of one architecture name their tensors under different prefixes (a BERT encoder: none from
    sentence-transformers, `bert.` from BertForX, `roberta.` from RoBERTa). When no prefix fits, the first
    one is returned and `validate` names the missing tensor.
    """
    anchor = next(spec for spec in specs if not spec.optional).names()[0]
    return next((prefix for prefix in prefixes if prefix + anchor in checkpoint), prefixes[0])


def with_prefix(specs: Sequence[TensorSpec], prefix: str) -> list[TensorSpec]:
    """The specs with `prefix` in front of every checkpoint name."""
    return [dataclasses.replace(spec, hf_name=prefix + spec.hf_name) for spec in specs]


def _absent(checkpoint: SafetensorsCheckpoint, spec: TensorSpec) -> bool:
    """Whether an optional spec has none of its tensors in the checkpoint (a partly present one is not absent)."""
    return spec.optional and not any(name in checkpoint for name in spec.names())


def validate(checkpoint: SafetensorsCheckpoint, specs: Sequence[TensorSpec]) -> None:
    """Checks names, shapes and dtypes of every tensor the specs need; raises naming the first problem."""
    for spec in specs:
        if _absent(checkpoint, spec):
            continue
        for name in spec.names():
            if name not in checkpoint:
                raise KeyError(f"{checkpoint.directory}: tensor {name!r} is missing from the checkpoint")
            found = checkpoint.shape(name)
            where = f"{checkpoint.file_of(name)}: tensor {name!r}"
            if found != tuple(spec.hf_shape):
                raise ValueError(f"{where} has shape {found}; expected {tuple(spec.hf_shape)}")
            if checkpoint.dtype_code(name) not in _FLOAT_CODES:
                raise TypeError(f"{where} has dtype {checkpoint.dtype_code(name)}, which cannot be cast to a "
                                f"floating-point parameter (expected one of {_FLOAT_CODES})")


def load_state(
    directory: str, specs: Sequence[TensorSpec], abstract_state: nnx.State, mesh: jax.sharding.Mesh | None,
    dtype: Any, *, prefixes: Sequence[str] = ("",),
) -> nnx.State:
    """Reads the checkpoint into a state shaped like `abstract_state`, each array placed into its shards.

    `prefixes`: the checkpoint key prefixes accepted in front of the specs' names (see `detect_prefix`).
    """
    checkpoint = SafetensorsCheckpoint(directory)
    specs = with_prefix(specs, detect_prefix(checkpoint, specs, prefixes))
    variables = _flat_variables(abstract_state)
    by_path = {spec.path: spec for spec in specs}
    missing = sorted(set(variables) - set(by_path))
    if missing:
        raise ValueError(f"no checkpoint mapping for parameters {missing}")
    validate(checkpoint, specs)
    target_dtype = np.dtype(jnp.dtype(dtype))

    loaded = {}
    for path, variable in variables.items():
        spec = by_path[path]
        shape = tuple(variable.get_value().shape)
        if mesh is None:
            sharding = SingleDeviceSharding(jax.local_devices()[0])  # this process's own device
        else:
            spec_ = shd.logical_to_spec(shd.variable_logical_axes(variable), shape, mesh)
            sharding = jax.sharding.NamedSharding(mesh, spec_)
        reader = _shard_reader(checkpoint, spec, shape, target_dtype)
        loaded[path] = variable.replace(jax.make_array_from_callback(shape, sharding, reader))
    return nnx.from_flat_state(loaded)


def _shard_reader(checkpoint: SafetensorsCheckpoint, spec: TensorSpec, shape: tuple[int, ...],
                  dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Callback for make_array_from_callback: reads only the layers a shard needs, then slices the rest.

    An absent optional tensor reads as zeros.
    """
    absent = _absent(checkpoint, spec)

    def convert(name: str) -> np.ndarray:
        out = np.asarray(spec.to_ours(checkpoint.read(name)))
        return out.astype(dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if absent:
            return np.zeros([len(range(*s.indices(n))) for s, n in zip(index, shape)], dtype)
        if spec.num_layers is None:
            full = convert(spec.hf_name)
            if full.shape != shape:
                raise ValueError(f"tensor {spec.hf_name!r} maps to shape {full.shape}; parameter {spec.path} "
                                 f"expects {shape}")
            return full[index]
        layers = range(*index[0].indices(spec.num_layers))
        return np.stack([convert(spec.hf_name.format(layer=i))[index[1:]] for i in layers])

    return read


def load_model(
    directory: str, factory: Callable[[], nnx.Module], specs: Sequence[TensorSpec], *, dtype: Any,
    mesh: jax.sharding.Mesh | None, prefixes: Sequence[str] = ("",),
) -> nnx.Module:
    """Builds the module abstractly (no allocation), then fills it from the checkpoint into its shards."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    state = load_state(directory, specs, abstract_state, mesh, dtype, prefixes=prefixes)
    return nnx.merge(graphdef, state)


def _host_tensors(variables: dict[tuple[str, ...], nnx.Variable], spec: TensorSpec,
                  dtype: Any) -> list[tuple[str, np.ndarray]]:
    """The checkpoint tensors of one parameter, gathered to the host and laid out as Hugging Face stores them."""
    if spec.path not in variables:
        raise ValueError(f"model has no parameter {spec.path} for tensor {spec.hf_name!r}")
    full = shd.to_host(variables[spec.path].get_value())
    if dtype is not None:
        full = full.astype(np.dtype(jnp.dtype(dtype)))
    if spec.num_layers is None:
        return [(spec.hf_name, np.ascontiguousarray(spec.to_hf(full)))]
    return [(spec.hf_name.format(layer=i), np.ascontiguousarray(spec.to_hf(full[i])))
            for i in range(spec.num_layers)]


def _plan_shards(variables: dict[tuple[str, ...], nnx.Variable], specs: Sequence[TensorSpec], dtype: Any,
                 max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Groups parameters into files of at most max_shard_bytes (a larger single parameter gets its own file)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        value = variables[spec.path].get_value()
        nbytes = math.prod(value.shape) * np.dtype(jnp.dtype(dtype or value.dtype)).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(path: str, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
    """Writes tensors (any of SAFETENSORS_DTYPES, bfloat16 included) as one safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors:
        code = _CODE_OF.get(array.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, array in tensors:
            f.write(array.tobytes())
    os.replace(tmp, path)


def save_checkpoint(
    model: nnx.Module, specs: Sequence[TensorSpec], directory: str, config: dict[str, Any], *,
    max_shard_bytes: int = 5 * 2**30, dtype: Any = None,
) -> None:
    """Writes config.json and the weights; above `max_shard_bytes` per file, a sharded checkpoint with index.

    Files are written one at a time, so the host holds at most one file's tensors. Every process takes part
    in gathering the arrays; only process 0 writes.
    """
    write = jax.process_index() == 0
    if write:
        os.makedirs(directory, exist_ok=True)
    variables = _flat_variables(nnx.state(model))
    missing = [spec.path for spec in specs if spec.path not in variables]
    if missing:
        raise ValueError(f"model has no parameters {missing}")
    plan = _plan_shards(variables, specs, dtype, max_shard_bytes)
    names = [SINGLE_FILE] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, plan):
        tensors = [t for spec in shard for t in _host_tensors(variables, spec, dtype)]
        total += sum(array.nbytes for _, array in tensors)
        weight_map.update({name: file_name for name, _ in tensors})
        if write:
            write_safetensors(os.path.join(directory, file_name), tensors)
    if not write:
        return
    index_path = os.path.join(directory, INDEX_FILE)
    if len(plan) > 1:
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(index_path):
        os.remove(index_path)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def parameter_count(module_or_state: Any) -> int:
    """Number of parameter scalars (works on abstract modules from `nnx.eval_shape`)."""
    state = nnx.state(module_or_state, nnx.Param) if isinstance(module_or_state, nnx.Module) else module_or_state
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
