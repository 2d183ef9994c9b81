"""Meshes and logical-axis sharding: one place that decides where every array lives.

Every parameter is created as `nnx.Param(value, logical_axes=("embed", "mlp"))`. A table of rules maps
logical names to mesh axes (`data`, `fsdp`, `tensor`). A dimension whose size does not divide the mesh axes it
maps to is replicated over the axes that do not divide it (Qwen2.5-3B has 2 KV heads; Qwen2.5-7B has 28
query heads): we never fail and never shard unevenly. The same model code then runs on one CPU, on 8 fake CPU
devices and on a TPU pod slice; only the mesh shape in the config changes.

Rules are read from a context (`use_rules`) so that model code and loaders need no extra arguments. The
defaults shard parameters' embedding dimension over `fsdp` and then `data` (ZeRO-3 over every data-parallel
device: per-device parameter bytes are total / devices) and heads, MLP and vocabulary over `tensor`; the batch
goes over (`data`, `fsdp`). To keep `data` a pure replica axis (e.g. across DCN slices), map "embed" to
"fsdp" alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

DEFAULT_RULES: Rules = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("cache_length", None),
    # Language-model parameters.
    ("vocab", "tensor"),
    ("embed", ("fsdp", "data")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Vision-tower parameters (their own names: the 3B tower's MLP width 3420 does not divide by 8).
    ("vision_embed", ("fsdp", "data")),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_head_dim", None),
    ("vision_patch", None),
    ("vision_layers", None),
    ("vision_norm", None),
    # Text-encoder parameters (BERT family; small enough that replication is the default).
    ("encoder_vocab", None),
    ("encoder_embed", None),
    ("encoder_mlp", None),
    ("encoder_heads", None),
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("m2io_jax_sharding_rules", default=DEFAULT_RULES)


def current_rules() -> Rules:
    """The logical-axis rules in force (set with `use_rules`)."""
    return _RULES.get()


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]] | None) -> Iterator[Rules]:
    """Sets the logical-axis rules for model creation, loading and activation constraints in this context."""
    normalized = DEFAULT_RULES if rules is None else tuple((str(k), _as_axes(v)) for k, v in rules)
    token = _RULES.set(normalized)
    try:
        yield normalized
    finally:
        _RULES.reset(token)


def _as_axes(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh with Auto (GSPMD) axis types.

    Args:
      shape: sizes per axis name; one axis may be -1 to take the remaining devices. Missing axes are 1.
        None: all devices on `fsdp`.
      devices: the devices to use (default: all).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict({"fsdp": -1} if shape is None else shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh shape has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
    rules: Rules | None = None,
) -> PartitionSpec:
    """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

    Mesh axes of size 1, axes already used by an earlier dimension and axes that would not divide the
    dimension evenly are dropped (the dimension is then replicated over them).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(current_rules() if rules is None else rules)
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = [a for a in (_as_axes(table[name]) or ()) if a in mesh_sizes] if name is not None else []
        chosen: list[str] = []
        for axis in axes:
            if axis in used or mesh_sizes[axis] == 1:
                continue
            if size % (math.prod(mesh_sizes[a] for a in chosen) * mesh_sizes[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was created with (all-replicated if it has none)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(variable.get_value().shape)
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A pytree like `state` (abstract or concrete) with a NamedSharding for every variable."""

    def one(variable: nnx.Variable) -> nnx.Variable:
        value = variable.get_value()
        spec = logical_to_spec(variable_logical_axes(variable), value.shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh | None, rules: Rules | None = None) -> nnx.Module:
    """Creates a module with every parameter initialised directly into its shards (no full host copy).

    The initialiser runs under `jax.jit(out_shardings=...)`, so each device computes only its own shard.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    if mesh is None:
        state = jax.jit(lambda: nnx.state(factory()))()
        return nnx.merge(graphdef, state)
    shardings = state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes of `tree`'s arrays held by each device (to check that sharding divides memory as intended)."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def to_host(tree: Any) -> Any:
    """`tree`'s arrays as whole numpy arrays on this host, also when they span other processes' devices.

    An array whose shards all live on this process's devices is copied out (`jax.device_get`), as is this
    process's copy of one replicated on every device; one sharded across processes is gathered from all of
    them (`multihost_utils.process_allgather`), a collective that every process must reach with the same
    tree, as the trainer's and sampler's lockstep code paths do.
    """
    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:  # every device holds all of it: this process's copy will do
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


DISTRIBUTED_MODES = ("auto", "on", "off")


def get_distributed_config() -> ml_collections.ConfigDict:
    """`config.distributed`: whether and how this process joins a multi-process run (`initialize_distributed`).

      initialize           "auto": when on a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several
                           hosts) or when coordinator_address is set; "on": always (jax finds the cluster: TPU,
                           SLURM, ...); "off": never (one process).
      coordinator_address  "host:port" of process 0 ("": jax finds it)
      num_processes        0: jax finds it
      process_id           -1: jax finds it
    """
    c = ml_collections.ConfigDict()
    c.initialize = "auto"
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    return c


def initialize_distributed(settings: ml_collections.ConfigDict) -> bool:
    """Calls `jax.distributed.initialize` as `settings` (`get_distributed_config`) say; returns whether it did.

    Must run before the first JAX computation. After it, `jax.devices()` lists every process's devices, the
    mesh spans them, and the code runs in lockstep on every process: each builds the same host-side batches,
    jit shards their device arrays over all devices, and `to_host` gathers results back.
    """
    if settings.initialize not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed.initialize={settings.initialize!r}: expected one of {DISTRIBUTED_MODES}")
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    wanted = settings.initialize == "on" or (settings.initialize == "auto" and (
        len(hosts) > 1 or bool(settings.coordinator_address)))
    if not wanted or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(coordinator_address=settings.coordinator_address or None,
                               num_processes=settings.num_processes or None,
                               process_id=None if settings.process_id < 0 else settings.process_id)
    return True


_BARRIER_TIMEOUT_MS = 60 * 60 * 1000
_barriers = 0


def wait_for_all_processes(name: str) -> None:
    """A barrier over the distributed runtime's key-value store (no device collective, so no device timeout)."""
    global _barriers
    from jax._src import distributed  # the client's barrier has no public wrapper; multihost_utils' uses devices

    _barriers += 1
    distributed.global_state.client.wait_at_barrier(f"m2io_jax/{_barriers}/{name}", _BARRIER_TIMEOUT_MS)


def _signature(tree: Any) -> Any:
    """What jit specializes on besides static arguments: the tree structure and each leaf's type and layout."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None),
                             getattr(x, "weak_type", False)) for x in leaves)


class LockstepJit:
    """`jax.jit(fun, **jit_kwargs)` that keeps the processes of a multi-process run in step around compilation.

    Processes compile a program separately and at their own pace; its first cross-process collective then waits
    for the slowest. On CPU (gloo) that wait times out after 30 s, which a loaded machine exceeds. So with
    several processes, the first call for each argument signature compiles ahead of time, waits at a barrier
    for every process to have compiled it, then runs; later calls reuse the compiled program. With one process
    it is exactly the jitted function. `lower` is the jitted function's (ahead-of-time compiles, fit checks).
    """

    def __init__(self, fun: Callable[..., Any], **jit_kwargs: Any):
        self._jitted = jax.jit(fun, **jit_kwargs)
        static = jit_kwargs.get("static_argnums", ())
        self._static = frozenset((static,) if isinstance(static, int) else static)
        self._name = getattr(fun, "__name__", "program")
        self._compiled: dict[Any, Any] = {}
        self.lower = self._jitted.lower

    def __call__(self, *args: Any) -> Any:
        if jax.process_count() == 1:
            return self._jitted(*args)
        key = tuple(a if i in self._static else _signature(a) for i, a in enumerate(args))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._jitted.lower(*args).compile()
            wait_for_all_processes(f"compiled {self._name}")
            self._compiled[key] = compiled
        return compiled(*(a for i, a in enumerate(args) if i not in self._static))
