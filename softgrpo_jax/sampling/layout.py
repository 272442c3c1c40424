"""How a rollout lays out its weights for decoding: the dtype and layer layout of the engine's copy
(:func:`resolve_layout`, :func:`decode_per_layer`), FSDP shards gathered once per rollout where a copy replicated
over the batch axes fits (:func:`decode_layout`), and otherwise the rows decoded in waves (:func:`rollout_waves`).
``softgrpo plan`` models memory with the same functions."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import BATCH_AXES
from softgrpo_jax.models.transformer import fuse_projections, unstack_layers


def resolve_layout(layout: str, platform: str) -> bool:
    """``layout`` -> whether the engine runs per-layer (unrolled) weights. ``auto``: per-layer on CPU, where XLA
    keeps small-batch dots on its fast GEMM path only for whole arrays, and on GPU, where the layer scan's loop
    costs more than the step's arithmetic at decode sizes (H200, Qwen2.5-1.5B shape: 2.6 vs 4.1 ms per step at
    batch 1, 2.3 vs 4.4 at batch 64; benchmarks/RESULTS.md); a layer scan elsewhere (TPU: unmeasured; compile time
    flat in depth)."""
    if layout not in ("auto", "scan", "per_layer"):
        raise ValueError(f"layout must be auto, scan or per_layer, got {layout!r}")
    return platform in ("cpu", "gpu") if layout == "auto" else layout == "per_layer"


def decode_per_layer(layout: str, platform: str, keeps_shards: bool) -> bool:
    """:func:`resolve_layout` for a rollout whose weights are laid out by :func:`decode_layout`: with
    ``keeps_shards`` (they decode from their FSDP shards, a copy replicated over the batch axes would not fit)
    "auto" takes the layer scan, whose loop gathers one layer's weights at a time. Per-layer weights' gathers do not
    depend on the step, and XLA may hoist them out of the decode loop (XLA:CPU does): every layer's gathered weights
    held at once, the replicated copy that did not fit (Llama-3.2-3B's rollout at 512 x 9,216 in one wave on 8 x 80
    GB: 81.9 GiB per device against the scan's 73.2, ``softgrpo plan``)."""
    if layout == "auto" and keeps_shards:
        return False
    return resolve_layout(layout, platform)


@functools.partial(jax.jit, static_argnames=("dtype", "per_layer", "fuse"))
def _prepare(params, *, dtype, per_layer: bool, fuse: bool = False):
    """The weights the engine decodes with: cast to the rollout dtype, the layer stack split when per-layer, the
    projections that read the same input fused when ``fuse`` (``models.transformer.fuse_projections``)."""
    if per_layer:
        params = unstack_layers(params, dtype)
    else:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return fuse_projections(params) if fuse else params


def _batch_axes(mesh) -> tuple:
    """The mesh's batch axes that split the batch (size > 1)."""
    return () if mesh is None else tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def decode_weight_sharding(sharding, mesh):
    """A weight's sharding for decoding: its own without the batch axes (tensor-parallel splits kept)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    axes = _batch_axes(mesh)
    spec = []
    for ax in sharding.spec:
        names = tuple(n for n in (ax if isinstance(ax, tuple) else (ax,)) if n is not None and n not in axes)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, P(*spec))


def replicated_weights_fit(weight_bytes: int, mesh, budget_bytes: int | None, other_bytes: int = 0) -> bool:
    """Whether a decode copy of the weights replicated over the batch axes (split over ``tensor`` only), beside
    ``other_bytes`` per device (the KV cache, what is already resident), stays within 60% of a device's
    ``budget_bytes`` (the rest is left to the programs' temporaries); None: unknown, taken to fit."""
    if budget_bytes is None:
        return True
    return weight_bytes / mesh.shape.get("tensor", 1) + other_bytes <= 0.6 * budget_bytes


def sharded_over_batch(params, mesh) -> bool:
    """Whether any weight is split over one of the mesh's batch axes (FSDP)."""
    axes = _batch_axes(mesh)
    return bool(axes) and any(isinstance(getattr(a, "sharding", None), NamedSharding) and any(
        ax in axes for ax in jax.tree.leaves(tuple(a.sharding.spec))) for a in jax.tree.leaves(params))


def device_memory(mesh) -> tuple[int | None, int]:
    """(memory limit, bytes in use) of this process's own device on ``mesh`` ((None, 0) where the platform reports
    nothing, as XLA:CPU). With several processes, the tightest: the smallest limit and the most in use over all of
    them, so that every process decides the decode layout and the waves alike (the same programs)."""
    dev = None if mesh is None else next((d for d in mesh.devices.flat if d.process_index == jax.process_index()),
                                         None)
    try:
        stats = (dev.memory_stats() if dev is not None else None) or {}
    except jax.errors.JaxRuntimeError:
        stats = {}
    limit, in_use = stats.get("bytes_limit"), int(stats.get("bytes_in_use", 0))
    if mesh is not None and jax.process_count() > 1:  # (every process decodes on a mesh, none without one)
        from jax.experimental import multihost_utils

        g = np.asarray(multihost_utils.process_allgather(np.asarray([-1 if limit is None else limit, in_use],
                                                                    np.int64))).reshape(-1, 2)
        limit = None if (g[:, 0] < 0).any() else int(g[:, 0].min())
        in_use = int(g[:, 1].max())
    return limit, in_use


def weight_bytes(params, dtype=None) -> int:
    """The bytes of ``params`` (arrays or ``ShapeDtypeStruct`` s) held in ``dtype`` (default their own)."""
    return sum(math.prod(a.shape) * jnp.dtype(dtype or a.dtype).itemsize for a in jax.tree.leaves(params))


def replicate_decode_weights(params, mesh, budget_bytes: int | None = None, kv_bytes: int = 0, dtype=None) -> bool:
    """Whether :func:`decode_layout` replicates ``params`` over the batch axes: they are split over one, and the
    replicated copy (in ``dtype``, default their own), the KV cache (``kv_bytes`` per device) and what the device
    already holds stay within 60% of ``budget_bytes`` (default: this process's device's memory limit where the
    platform reports one)."""
    if not sharded_over_batch(params, mesh):
        return False
    in_use = 0
    if budget_bytes is None:
        budget_bytes, in_use = device_memory(mesh)
    return replicated_weights_fit(weight_bytes(params, dtype), mesh, budget_bytes, kv_bytes + in_use)


MAX_WAVES = 4  # beyond this many, a rollout decodes from the FSDP shards in one wave (each wave pays its own tail)


def wave_prompts(n_prompts: int, waves: int, devices: int) -> int:
    """Prompts per wave: whole prompts, a multiple of the batch devices where that keeps the number of waves (each
    device then prefills its own prompts once)."""
    per = -(-n_prompts // waves)
    if n_prompts % devices == 0 and -(-n_prompts // (-(-per // devices) * devices)) == waves:
        per = -(-per // devices) * devices
    return per


def rollout_waves(w_bytes: int, rows_per_device: int, kv_bytes_per_row: int, mesh, budget_bytes: int | None,
                  in_use: int = 0, sharded: bool = True, max_waves: int = MAX_WAVES) -> int:
    """How many waves a rollout's rows decode in, one after the other (``RolloutEngine(max_rows_per_device=0)``):
    1 where the weights are not split over a batch axis (``sharded``) or their replicated copy fits beside every
    row's KV cache (:func:`replicated_weights_fit`); else the fewest, up to ``max_waves``, whose share of the rows
    leaves room for it; 1 again where none does (the weights then decode from their FSDP shards).

    Why: decoding from FSDP shards gathers every layer's weights at every step, about 5.6 GB per device and step
    for Llama-3.2-3B on 8 devices (~12 ms over 450 GB/s links) and 13 GB for a 7B, against 2-5 ms for the step's
    own weight reads; a wave with replicated weights reads them locally, and two waves of half the rows cost
    about what one wave of all the rows would (bytes per row-step), plus a second tail (an estimate from bytes:
    not measured on a GPU)."""
    if not sharded or rows_per_device <= 1:
        return 1
    for k in range(1, max_waves + 1):
        rows = -(-rows_per_device // k)
        if replicated_weights_fit(w_bytes, mesh, budget_bytes, rows * kv_bytes_per_row + in_use):
            return k
    return 1


def decode_layout(params, mesh, budget_bytes: int | None = None, kv_bytes: int = 0, replicate: bool | None = None):
    """The weights as a decode step wants them on ``mesh``: replicated over the batch axes (FSDP shards gathered
    once per rollout, not at every step inside the loop), tensor-parallel splits kept, where
    :func:`replicate_decode_weights` says so (or ``replicate``, decided already); else as they are."""
    if replicate is None:
        replicate = replicate_decode_weights(params, mesh, budget_bytes, kv_bytes)
    if not replicate:
        return params
    return jax.tree.map(lambda a: jax.device_put(a, decode_weight_sharding(a.sharding, mesh))
                        if isinstance(getattr(a, "sharding", None), NamedSharding) else a, params)
