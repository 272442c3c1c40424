"""``soft_embed``: sum_k w[..., k] * table[ids[..., k]] (XLA reference path; Pallas kernels dispatch from here).

Shapes: table [V, D]; ids, weights [..., K]; output [..., D] in the table's dtype (accumulated in float32).
The fused form takes the rollout's stored perturbed log-probs ytil and tau and builds the weights itself:
w = softmax(ytil / tau) over the K slots, with slots 1..K-1 masked at discrete positions (a one-hot on slot 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def soft_embed(table: jax.Array, ids: jax.Array, weights: jax.Array, *, impl: str = "xla") -> jax.Array:
    """sum_k weights[..., k] * table[ids[..., k]] -> [..., D]."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    return _xla_soft_embed(table, ids, weights)


def soft_embed_fused(table: jax.Array, ids: jax.Array, ytil: jax.Array, tau, discrete: jax.Array | None = None,
                     *, impl: str = "xla") -> jax.Array:
    """soft_embed with w = softmax(ytil / tau) (slots 1..K-1 masked where ``discrete``)."""
    return soft_embed(table, ids, soft_weights(ytil, tau, discrete), impl=impl)
