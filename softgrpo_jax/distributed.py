"""Meshes, shardings and multi-host initialisation.

One mesh with named axes ``("data", "fsdp", "tensor")``. The axes are created as ``AxisType.Auto`` on purpose:
parameters and batches are placed with explicit ``NamedSharding``s, and XLA's sharding propagation (GSPMD) handles the
rest inside ``jit``; no code here depends on Explicit-mode sharding-in-types. A mesh of one device (or ``mesh=None``)
runs the same code unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def make_mesh(shape: Sequence[int] | dict[str, int] | None = None, devices=None) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh. ``shape=None`` puts every device on ``data``.

    ``shape`` may be a tuple of three ints (one may be -1, meaning "the rest") or a dict by axis name.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = (n, 1, 1)
    if isinstance(shape, dict):
        unknown = set(shape) - set(AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {AXES}")
        shape = tuple(shape.get(a, 1) for a in AXES)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries for axes {AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = n // rest
    if math.prod(shape) != n:
        raise ValueError(f"mesh shape {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, have {n}")
    arr = np.asarray(devices, dtype=object).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(arr, AXES, axis_types=auto)


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
    """Drop mesh axes from ``spec`` where they do not divide the dimension (those dims are replicated)."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if ax is None:
            out.append(None)
            continue
        names = ax if isinstance(ax, tuple) else (ax,)
        kept = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in kept)
        if not kept or dim % size:
            # try keeping a prefix that divides
            while kept and dim % math.prod(mesh.shape[a] for a in kept):
                kept = kept[:-1]
        out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    return P(*out)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an NNX state (or any pytree of Variables / arrays) from each Param's ``pspec``."""

    def f(x):
        if isinstance(x, nnx.Variable):
            spec = x.get_metadata().get("pspec", P())
            return NamedSharding(mesh, fit_spec(x[...].shape, spec, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Shard dim 0 over the data-parallel axes (when it divides), replicate the rest."""
    spec = P(BATCH_AXES, *([None] * (ndim - 1)))
    if batch_size is not None:
        spec = fit_spec((batch_size,) + (1,) * (ndim - 1), spec, mesh)
    return NamedSharding(mesh, spec)


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Place every array of ``tree`` with its leading (batch) axis split over the data-parallel axes."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, np.ndim(a), np.shape(a)[0]))
                        if np.ndim(a) else jax.device_put(a, NamedSharding(mesh, P())), tree)


def shard_model(model: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """Place a model's parameters on ``mesh`` by their PartitionSpecs (in place)."""
    if mesh is None:
        return model
    state = nnx.state(model)
    sh = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, sh))
    return model


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, cpu_collectives: str | None = None) -> None:
    """Join JAX's multi-host runtime. With no arguments, auto-detects Cloud TPU / SLURM / Open MPI.

    ``cpu_collectives="gloo"`` enables cross-process collectives for CPU devices (tests, laptops).
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
    return jax.process_index() == 0
