"""Rotary position embeddings applied to queries and keys (HF's rotate-half convention), and their transpose."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd]; cos/sin [B, T, hd]. Computed in float32 and rounded once to x's dtype (HF rounds after
    each of its bf16 products: differences within one bf16 ulp). XLA:CPU has no bf16 arithmetic and rounds after
    every op of a bf16 chain; in float32 the rotation's forward + backward for SmolLM2's queries (16 x 256
    tokens) takes 0.9 ms instead of 8.6 (benchmarks/bench_cpu_attention.py)."""
    xf = x.astype(jnp.float32)
    return (xf * cos[:, :, None, :] + rotate_half(xf) * sin[:, :, None, :]).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half: [x1, x2] -> [-x2, x1] over the last dim (its transpose is minus itself)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_transpose(g: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The transpose of ``apply_rope``'s rotation in float32: g * cos - rotate_half(g * sin) (cos / sin broadcast
    to g)."""
    return g * cos - rotate_half(g * sin)
