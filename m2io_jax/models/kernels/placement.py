"""Where the Pallas kernels run: compiled for TPU or interpreted, and once per shard under a mesh.

A Mosaic (TPU) kernel only compiles for a TPU and is not partitioned by XLA. So every kernel call goes through
`per_shard`, which wraps it in `jax.shard_map` over the mesh in context (each device runs the kernel on its
own rows and heads), and asks `interpret_mode` whether to run it in Pallas interpret mode: yes unless the
devices being compiled for are TPUs. The target is the mesh in context (`jax.set_mesh`), which may be an
ahead-of-time TPU topology on a CPU host (`jax.experimental.topologies`), else the default backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from m2io_jax.sharding import logical_to_spec


def interpret_mode() -> bool:
    """True unless the kernels are being compiled for TPU devices (the context mesh's, else the default's)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.platform != "tpu"
    return jax.default_backend() != "tpu"


def per_shard(
    kernel: Callable[..., jax.Array], args: Sequence[jax.Array], in_axes: Sequence[Sequence[str | None]],
    out_axes: Sequence[str | None], out_shape: Sequence[int],
) -> jax.Array:
    """`kernel(*args)`, run once per shard of the mesh in context (directly without a mesh).

    in_axes: the logical axis names of each argument (`m2io_jax.sharding` rules map them to mesh axes; a
    dimension they do not divide is replicated); out_axes / out_shape: those of the one output. The kernel must
    treat the sharded dimensions (rows, heads) as independent: it sees its shard's slice of them.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)
    in_specs = tuple(logical_to_spec(axes, arg.shape, mesh) for axes, arg in zip(in_axes, args))
    out_specs = logical_to_spec(out_axes, out_shape, mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
