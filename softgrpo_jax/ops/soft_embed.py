"""``soft_embed``: sum_k w[..., k] * table[ids[..., k]], the input embedding of a soft-thinking step.

Shapes: table [V, D]; ids, weights [..., K]; output [..., D] in the table's dtype (accumulated in float32).
The fused form takes the rollout's stored perturbed log-probs ytil and tau and builds the weights itself:
w = softmax(ytil / tau) over the K slots, with slots 1..K-1 masked at discrete positions (a one-hot on slot 0).

Implementations (``impl``):
- ``"xla"``: gather + einsum, left to XLA (the reference; differentiable by ordinary autodiff).
- ``"pallas"``: one-pass kernels, ``ops/pallas_gpu.py`` (Triton lowering, for Hopper) and ``ops/pallas_tpu.py``
  (Mosaic TPU, ids scalar-prefetched, rows fetched by double-buffered DMA). A custom VJP makes them differentiable in
  the weights (or ytil and tau for the fused form) and in the table (a scatter-add); the backward pass is XLA.
  ``interpret=True`` runs a kernel on CPU (Pallas interpret mode; ``kernel`` picks which one, default the GPU one
  off-TPU); it is slow and meant for tests.
- ``"auto"`` (default): the kernel on GPU and TPU, XLA on CPU. Also XLA under a sharded (non-manual) mesh context or
  on more than one device outside one: a Pallas call has no SPMD partitioning rule, so XLA would gather its sharded
  operands onto every device. Under ``jax.shard_map`` (all mesh axes manual) auto uses the kernel on the local shard.
  ``Tuning.soft_embed_impl`` (default from ``$SOFTGRPO_SOFT_EMBED_IMPL=xla|pallas``) overrides what ``auto`` picks
  (an escape hatch).

The ids must lie in [0, V): the kernels clamp them into the table (a memory-safety guard, not a feature).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.tuning import SOFT_EMBED_ENV, tuning

IMPLS = ("auto", "xla", "pallas")
KERNELS = ("gpu", "tpu")
ENV_IMPL = SOFT_EMBED_ENV


def soft_weights(ytil: jax.Array, tau, discrete: jax.Array | None = None) -> jax.Array:
    """softmax(ytil / tau) over the last axis, float32; rows with ``discrete`` set become one-hot on slot 0."""
    y = ytil.astype(jnp.float32) / jnp.asarray(tau, jnp.float32)[..., None] if jnp.ndim(tau) else \
        ytil.astype(jnp.float32) / jnp.float32(tau)
    if discrete is not None:
        slot = jnp.arange(ytil.shape[-1])
        y = jnp.where(discrete[..., None] & (slot > 0), -jnp.inf, y)
    return jax.nn.softmax(y, axis=-1)


def _xla_soft_embed(table, ids, weights):
    rows = jnp.take(table, ids, axis=0)  # [..., K, D]
    out = jnp.einsum("...k,...kd->...d", weights.astype(jnp.float32), rows.astype(jnp.float32))
    return out.astype(table.dtype)


# ------------------------------------------------------------------------------------------------------- dispatch


def _kernel_fits_context() -> bool:
    """False where a Pallas call would be replicated by the SPMD partitioner (see the module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names)
    return jax.device_count() == 1


def resolve_impl(impl: str = "auto", interpret=False) -> str:
    """The implementation ``impl`` stands for here: ``"xla"`` or ``"pallas"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = tuning().soft_embed_impl
        if forced in ("xla", "pallas"):
            return forced
        if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") and _kernel_fits_context():
            return "pallas"
        return "xla"
    if impl == "pallas" and not interpret and jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu"):
        raise ValueError(f"impl='pallas' needs a GPU or TPU (backend here: {jax.default_backend()!r}); on CPU use "
                         "impl='xla', or interpret=True to run the kernel in Pallas interpret mode (tests)")
    return impl


def _kernel_module(kernel: str | None):
    if kernel is None:
        kernel = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    if kernel == "tpu":
        from softgrpo_jax.ops import pallas_tpu as mod
    else:
        from softgrpo_jax.ops import pallas_gpu as mod
    return mod


# ---------------------------------------------------------------------------------------------------- custom VJPs


def _bwd_rows(table, ids, weights, g):
    """Cotangents of out[n] = sum_k w[n,k] table[ids[n,k]] for g [N, D]: (dweights [N, K] f32, dtable [V, D] f32).

    dweights is a gather-dot; dtable a scatter-add, one slot at a time so no [N, K, D] array is built.
    """
    g32 = g.astype(jnp.float32)
    w32 = weights.astype(jnp.float32)
    k = ids.shape[-1]
    dw = jnp.stack([jnp.einsum("nd,nd->n", g32, jnp.take(table, ids[:, s], axis=0).astype(jnp.float32))
                    for s in range(k)], axis=-1)
    dtable = jnp.zeros(table.shape, jnp.float32)
    for s in range(k):
        dtable = dtable.at[ids[:, s]].add(w32[:, s:s + 1] * g32)
    return dw, dtable


@functools.lru_cache(maxsize=None)
def _pallas_plain(kernel, interpret, config):
    fwd = functools.partial(_kernel_module(kernel).soft_embed, config=config, interpret=interpret)

    @jax.custom_vjp
    def f(table, ids, weights):
        return fwd(table, ids, weights)

    def f_fwd(table, ids, weights):
        return fwd(table, ids, weights), (table, ids, weights)

    def f_bwd(res, g):
        table, ids, weights = res
        dw, dtable = _bwd_rows(table, ids, weights, g)
        return dtable.astype(table.dtype), None, dw.astype(weights.dtype)

    f.defvjp(f_fwd, f_bwd)
    return f


@functools.lru_cache(maxsize=None)
def _pallas_fused(kernel, interpret, config):
    fwd = functools.partial(_kernel_module(kernel).soft_embed_fused, config=config, interpret=interpret)

    @jax.custom_vjp
    def f(table, ids, ytil, tau, discrete):
        return fwd(table, ids, ytil, tau, discrete)

    def f_fwd(table, ids, ytil, tau, discrete):
        return fwd(table, ids, ytil, tau, discrete), (table, ids, ytil, tau, discrete)

    def f_bwd(res, g):
        table, ids, ytil, tau, discrete = res
        w, weights_vjp = jax.vjp(lambda y, t: soft_weights(y, t, discrete), ytil, tau)
        dw, dtable = _bwd_rows(table, ids, w, g)
        dytil, dtau = weights_vjp(dw)
        return dtable.astype(table.dtype), None, dytil.astype(ytil.dtype), dtau, None

    f.defvjp(f_fwd, f_bwd)
    return f


# ------------------------------------------------------------------------------------------------------ public API


def _check(table, ids, other, name):
    if table.ndim != 2:
        raise ValueError(f"table must be [V, D], got shape {table.shape}")
    if ids.shape != other.shape:
        raise ValueError(f"ids {ids.shape} and {name} {other.shape} must have the same shape [..., K]")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")


def soft_embed(table: jax.Array, ids: jax.Array, weights: jax.Array, *, impl: str = "auto", interpret=False,
               kernel: str | None = None, config=None) -> jax.Array:
    """sum_k weights[..., k] * table[ids[..., k]] -> [..., D].

    ``interpret``, ``kernel`` ("gpu" / "tpu") and ``config`` (a ``pallas_gpu.GpuConfig`` / ``pallas_tpu.TpuConfig``)
    only matter for the Pallas path.
    """
    _check(table, ids, weights, "weights")
    if resolve_impl(impl, interpret) == "xla":
        return _xla_soft_embed(table, ids, weights)
    lead, k = ids.shape[:-1], ids.shape[-1]
    out = _pallas_plain(kernel, interpret, config)(table, ids.reshape(-1, k), weights.reshape(-1, k))
    return out.reshape(*lead, table.shape[1])


def soft_embed_fused(table: jax.Array, ids: jax.Array, ytil: jax.Array, tau, discrete: jax.Array | None = None,
                     *, impl: str = "auto", interpret=False, kernel: str | None = None, config=None) -> jax.Array:
    """soft_embed with w = softmax(ytil / tau) (slots 1..K-1 masked where ``discrete``), in one pass on the kernel path.

    tau: a scalar or an array broadcastable to ids.shape[:-1] (e.g. [B, 1] per row); discrete: ids.shape[:-1] or None.
    """
    _check(table, ids, ytil, "ytil")
    if resolve_impl(impl, interpret) == "xla":
        return _xla_soft_embed(table, ids, soft_weights(ytil, tau, discrete))
    lead, k = ids.shape[:-1], ids.shape[-1]
    n = ids.size // k if k else 0
    tau = jnp.asarray(tau, jnp.float32)
    tau = tau.reshape(1) if tau.ndim == 0 else jnp.broadcast_to(tau, lead).reshape(n)
    if discrete is not None:
        discrete = jnp.broadcast_to(discrete, lead).reshape(n)
    out = _pallas_fused(kernel, interpret, config)(table, ids.reshape(n, k), ytil.reshape(n, k), tau, discrete)
    return out.reshape(*lead, table.shape[1])
