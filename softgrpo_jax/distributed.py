"""Meshes, shardings and multi-host initialisation.

One mesh with named axes ``("data", "fsdp", "tensor")``. The axes are created as ``AxisType.Auto`` on purpose:
parameters and batches are placed with explicit ``NamedSharding``s, and XLA's sharding propagation (GSPMD) handles the
rest inside ``jit``; no code here depends on Explicit-mode sharding-in-types. A mesh of one device (or ``mesh=None``)
runs the same code unchanged.

Multi-host (one JAX process per host, or per GPU node): :func:`initialize` joins JAX's distributed runtime from CLI
flags, ``SOFTGRPO_*`` environment variables, or the cluster's own environment (Cloud TPU, SLURM, Open MPI). Every
process then runs the same program on the global mesh. Host data enters through :func:`host_to_global` (each process
transfers only the rows its own devices hold) and leaves through :func:`to_host` (a collective gather for arrays that
span other processes). :func:`local_rows` / :func:`allgather_rows` let each process do per-row host work (reward
scoring) on its own rows only and share the results. Only process 0 writes logs and exports
(:func:`is_main_process`); every process takes part in collectives and orbax saves.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softgrpo_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


class MeshError(UserError, ValueError):
    """A mesh shape that does not fit the devices (``trainer.mesh``, ``--mesh``)."""


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
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; valid axes: {AXES}")
        shape = tuple(shape.get(a, 1) for a in AXES)
    shape = list(shape)
    if len(shape) != 3:
        raise MeshError(f"mesh shape must have 3 entries for axes {AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise MeshError(f"mesh shape {tuple(shape)}: at most one mesh axis may be -1")
    if any(not isinstance(s, (int, np.integer)) or (s < 1 and s != -1) for s in shape):
        raise MeshError(f"mesh shape {tuple(shape)}: each entry is a device count >= 1, or -1 for the rest")
    given = tuple(shape)
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = n // rest
    if math.prod(shape) != n or 0 in shape:
        raise MeshError(f"mesh shape {given} ({dict(zip(AXES, shape))}) needs {math.prod(shape)} devices, have "
                        f"{n}; choose entries whose product is {n} (or use -1 for one axis)")
    arr = _device_grid(devices, shape)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(arr, AXES, axis_types=auto)


def _device_grid(devices, shape):
    """Devices arranged as ``shape``. On TPU, ``mesh_utils`` maps mesh axes onto the physical ICI torus (the innermost
    axes, fsdp and tensor, get the fastest links); elsewhere (GPU, CPU) devices keep ``jax.devices()`` order, which
    is process-major, so each process holds a contiguous block of the batch."""
    if devices and devices[0].platform == "tpu" and len(devices) == len(jax.devices()):
        try:
            from jax.experimental import mesh_utils

            return mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 - an unusual topology: fall back to the plain order
            pass
    return np.asarray(devices, dtype=object).reshape(shape)


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
            return NamedSharding(mesh, fit_spec(x.get_value().shape, spec, mesh))  # arrays or ShapeDtypeStructs
        return NamedSharding(mesh, P())

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Shard dim 0 over the data-parallel axes (when it divides), replicate the rest."""
    spec = P(BATCH_AXES, *([None] * (ndim - 1)))
    if batch_size is not None:
        spec = fit_spec((batch_size,) + (1,) * (ndim - 1), spec, mesh)
    return NamedSharding(mesh, spec)


# ---------------------------------------------------------------------------------------------------- activations
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("softgrpo_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """While tracing inside this context, :func:`constrain_batch` pins activations' batch dim to ``mesh``."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_activation_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`activation_sharding` (None outside one)."""
    return _ACTIVATION_MESH.get()


def with_activation_sharding(mesh: Mesh | None, fn: Callable) -> Callable:
    """``fn`` traced under :func:`activation_sharding` (wrap before ``jax.jit``; the mesh is fixed per wrapper)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return wrapped


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin dim 0 (batch) of an activation to the data-parallel axes, replicated elsewhere; a no-op outside
    :func:`activation_sharding`.

    Why: with FSDP weights sharded on their input (contraction) dim, GSPMD otherwise may keep the weight sharded
    and all-reduce whole-batch activations instead of all-gathering the weight. ``softgrpo plan`` measured that
    choice in the log-prob pass of the 1.5B model (8 devices, 2 sequences of 2048 tokens each): 18.6 GiB of
    temporaries per device (full-batch float32 logits) against 1.6 GiB with the constraint.
    """
    mesh = current_activation_mesh()
    if mesh is None or not getattr(x, "ndim", 0):
        return x
    spec = fit_spec(x.shape, P(BATCH_AXES, *([None] * (x.ndim - 1))), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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


# ---------------------------------------------------------------------------------------------------- multi-host
ENV_COORDINATOR = "SOFTGRPO_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "SOFTGRPO_NUM_PROCESSES"
ENV_PROCESS_ID = "SOFTGRPO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SOFTGRPO_LOCAL_DEVICE_IDS"  # e.g. "0,1,2,3" (GPU ids this process drives)
ENV_CPU_COLLECTIVES = "SOFTGRPO_CPU_COLLECTIVES"  # "gloo" for CPU-only multi-process runs
ENV_DISTRIBUTED = "SOFTGRPO_DISTRIBUTED"  # "auto" (default), "off" (never initialise), "on" (always, auto-detect)


class DistributedError(UserError, RuntimeError):
    """A multi-host setting that cannot be used (flags, environment) or a runtime that could not be joined."""


def detect_cluster(environ=None) -> str | None:
    """Which multi-process launcher started us, from the environment alone (no network queries).

    Returns ``"explicit"`` (SOFTGRPO_COORDINATOR set), ``"slurm"`` (srun with more than one task), ``"ompi"``
    (mpirun with more than one rank), ``"cloud_tpu"`` (a Cloud TPU VM or a GKE TPU pod), or None (one process).
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_COORDINATOR):
        return "explicit"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("TPU_WORKER_ID"):
        return "cloud_tpu"
    if environ is None and _on_tpu_vm():
        return "cloud_tpu"
    return None


def _on_tpu_vm() -> bool:
    """A TPU VM (GCE queued resource or plain TPU VM): libtpu installed and TPU devices present. Checked without
    starting a backend; JAX's own detection then finds the workers through the metadata server."""
    import glob
    import importlib.util

    try:
        has_libtpu = importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        has_libtpu = False
    return has_libtpu and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def runs_on_cpu(environ=None) -> bool:
    """Whether JAX will compute on the CPU, judged without starting a backend (the command line reads its config
    before it joins a multi-host runtime): the first of ``JAX_PLATFORMS`` when set; else neither a TPU VM nor a GPU
    (a JAX plugin installed, through JAX's "jax_plugins" entry points, and an NVIDIA or AMD device node present)."""
    import glob
    import importlib.metadata

    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if _on_tpu_vm():
        return False
    gpu_plugin = bool(list(importlib.metadata.entry_points(group="jax_plugins")))
    return not (gpu_plugin and bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd")))


def _int_env(name: str, env) -> int | None:
    v = env.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, cpu_collectives: str | None = None, *,
               mode: str | None = None, initialization_timeout: int = 300, environ=None) -> dict:
    """Join JAX's multi-host runtime, once, before anything touches a device.

    Precedence: arguments (the CLI's ``--coordinator/--num-processes/--process-id``), then ``SOFTGRPO_COORDINATOR``,
    ``SOFTGRPO_NUM_PROCESSES``, ``SOFTGRPO_PROCESS_ID`` (and ``SOFTGRPO_LOCAL_DEVICE_IDS``), then auto-detection:
    on Cloud TPU (``gcloud ... ssh --worker=all``, xpk / GKE), under SLURM (``srun``) and Open MPI (``mpirun``)
    ``jax.distributed.initialize()`` finds the coordinator, process count and id itself. Nothing detected: a single
    process, and nothing is initialised. ``mode`` (or ``SOFTGRPO_DISTRIBUTED``): "auto", "off" or "on".
    ``cpu_collectives="gloo"`` (or ``SOFTGRPO_CPU_COLLECTIVES``) enables cross-process collectives for CPU devices.

    Returns ``{"initialized": bool, "how": str, "process_id": int, "num_processes": int}``.
    """
    env = os.environ if environ is None else environ
    mode = (mode or env.get(ENV_DISTRIBUTED) or "auto").lower()
    if mode not in ("auto", "off", "on"):
        raise DistributedError(f"{ENV_DISTRIBUTED}={mode!r}: use auto, off or on")
    if jax.distributed.is_initialized():
        return dict(initialized=True, how="already", process_id=jax.process_index(),
                    num_processes=jax.process_count())
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _int_env(ENV_NUM_PROCESSES, env)
    if process_id is None:
        process_id = _int_env(ENV_PROCESS_ID, env)
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(i) for i in env[ENV_LOCAL_DEVICE_IDS].split(",") if i.strip()]
    cpu_collectives = cpu_collectives or env.get(ENV_CPU_COLLECTIVES) or None
    if mode == "off":
        return dict(initialized=False, how="off", process_id=0, num_processes=1)

    kwargs: dict[str, Any] = {"initialization_timeout": initialization_timeout}
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise DistributedError(
                f"coordinator {coordinator_address!r} given without the process count and this process's id: pass "
                f"--num-processes N --process-id I (or set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process id {process_id} is outside [0, {num_processes})")
        if ":" not in coordinator_address:
            raise DistributedError(f"coordinator {coordinator_address!r} must be host:port (e.g. 10.0.0.1:8476)")
        how = "explicit"
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif num_processes is not None or process_id is not None:
        raise DistributedError(f"--num-processes/--process-id need a coordinator: pass --coordinator HOST:PORT "
                               f"(or set {ENV_COORDINATOR})")
    else:
        how = detect_cluster(environ)
        if how is None and mode == "auto":
            return dict(initialized=False, how="single", process_id=0, num_processes=1)
        how = how or "auto"
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"jax.distributed.initialize ({how}) failed: {e}. Check that every process got the "
                               f"same coordinator address and process count, that the coordinator port is open "
                               f"between hosts, and that nothing used a device before initialisation") from e
    return dict(initialized=True, how=how, process_id=jax.process_index(), num_processes=jax.process_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


def host_to_global(a, sharding) -> jax.Array:
    """A host array (the same global value on every process) as a jax.Array with ``sharding``.

    One process: ``jax.device_put``. Several: each process transfers only the slices its own devices hold
    (``jax.make_array_from_callback``), so a process touches only its rows of a batch.
    """
    a = np.asarray(a)
    if sharding is None:
        return jax.device_put(a)
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def _gather_replicated(x: jax.Array) -> np.ndarray:
    sh = x.sharding
    if isinstance(sh, NamedSharding):
        rep = NamedSharding(sh.mesh, P())
        return np.asarray(jax.jit(lambda a: a, out_shardings=rep)(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(x, *, chunk_bytes: int = 1 << 30) -> np.ndarray:
    """The global value of ``x`` as a NumPy array on this host.

    Arrays held entirely by this process (and fully replicated ones) are read directly. An array that spans other
    processes' devices is gathered: a collective, so every process must call ``to_host`` on it in the same order.
    Large arrays are gathered ``chunk_bytes`` at a time along axis 0, so no device holds a whole replicated copy.
    """
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    n0 = x.shape[0] if x.ndim else 1
    row_bytes = max(1, x.nbytes // max(n0, 1))
    step = max(1, chunk_bytes // row_bytes)
    if x.ndim == 0 or step >= n0:
        return _gather_replicated(x)
    parts = []
    for i in range(0, n0, step):
        j = min(n0, i + step)
        part = jax.jit(lambda a, i=i, j=j: a[i:j])(x)
        parts.append(_gather_replicated(part))
    return np.concatenate(parts, axis=0)


def tree_to_host(tree: Any) -> Any:
    """:func:`to_host` over a pytree (collective; every process calls it)."""
    return jax.tree.map(to_host, tree)


def local_rows(x, axis: int = 0) -> np.ndarray:
    """Global indices along ``axis`` of ``x`` held by this process's devices (sorted). All of them for an array on
    one process (or replicated); in a multi-process run, the rows this process should do host work for."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.arange(np.shape(x)[axis])
    n = x.shape[axis]
    rows: set[int] = set()
    for s in x.addressable_shards:
        rows.update(range(*s.index[axis].indices(n)))
    return np.asarray(sorted(rows), np.int64)


def allgather_rows(values, rows, n: int) -> np.ndarray:
    """Each process gives ``values`` [len(rows), ...] for its ``rows`` (from :func:`local_rows`); returns the full
    [n, ...] array on every process (collective). Rows held by several processes take the lowest process's value."""
    values = np.asarray(values)
    rows = np.asarray(rows, np.int64)
    buf = np.zeros((n,) + values.shape[1:], values.dtype)
    have = np.zeros((n,), bool)
    buf[rows] = values
    have[rows] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        g = multihost_utils.process_allgather({"v": buf, "h": have}, tiled=False)
        allv, allh = np.asarray(g["v"]), np.asarray(g["h"])  # [processes, n, ...]
        if not allh.any(0).all():
            missing = np.flatnonzero(~allh.any(0))[:10]
            raise DistributedError(f"allgather_rows: no process supplied rows {missing.tolist()}")
        first = np.argmax(allh, axis=0)
        return allv[first, np.arange(n)]
    if not have.all():
        raise DistributedError(f"allgather_rows: rows {np.flatnonzero(~have)[:10].tolist()} missing")
    return buf


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
