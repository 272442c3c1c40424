"""The SwiGLU MLP: ``silu(g) * u`` computed in float32 and rounded once, and on single-device XLA:CPU with 16-bit
compute the whole MLP over token tiles with a written-out backward."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.matmul import mm, tn_dot, transpose_tiled
from softgrpo_jax.ops.tiling import map_rows
from softgrpo_jax.ops.tuning import cpu_single_device, tiles_ok, tuning


def mlp_tile_rows(h: jax.Array) -> int:
    """Rows per tile for ``swiglu_mlp`` on this input, or 0 for the plain path: only for 16-bit compute on
    single-device XLA:CPU (elsewhere the compilers fuse the plain path well, and a loop over token tiles would
    fight GSPMD's batch sharding). The tile is the largest multiple of 8 up to ``Tuning.mlp_tile_rows`` dividing the
    token count, and at least 64 (or ``Tuning.mlp_tile_rows`` if smaller); otherwise, or with fewer tokens than a
    tile, one tile."""
    N = math.prod(h.shape[:-1])
    most = tuning().mlp_tile_rows
    if not most or h.dtype.itemsize != 2 or not cpu_single_device():
        return 0
    if N <= most:
        return N
    for r in range(most - most % 8, min(64, most) - 1, -8):
        if N % r == 0:
            return r
    return N


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def swiglu_mlp(h, wg, wu, wd, rows):
    """The SwiGLU MLP ``(silu(h Wg) * (h Wu)) Wd`` for h [N, D] in a 16-bit compute dtype and weights of any dtype
    (cast to h's), over tiles of ``rows`` tokens, with the same roundings as the plain path (each GEMM's float32
    result rounded to h's dtype, ``swiglu`` rounded once).

    Why tiles (XLA:CPU): the gate and up GEMMs write float32 [N, F] results that the SwiGLU then reads back; at
    SmolLM2's training shape (16 x 256 tokens) those are 25 MB each. Over tiles of 512 tokens the float32
    intermediates stay in cache: a 30-layer rematerialised MLP stack's forward + backward 3.7-4.1 -> 2.9-3.1 s (1.19-1.39x)
    (``benchmarks/bench_cpu_update_ab.py --mlp``), the SmolLM2 update 1.08x faster. The backward recomputes each tile's gate and up GEMMs from h (the only activation
    saved, as flash attention does with its scores), so under remat the layer's recomputed forward skips the MLP
    altogether, and without remat the saved residuals shrink from four [N, F]-sized arrays to one [N, D]. The
    weight gradients are accumulated over the tiles in float32 (in cache too: 1.35 -> ~0.6 s of GEMMs in the
    SmolLM2 update against whole-N weight-gradient GEMMs) and returned in each weight's dtype. h's gradient sums
    the gate and up terms in float32 and rounds once (the plain path rounds each, then adds in bf16)."""
    return _swiglu_mlp_fwd(h, wg, wu, wd, rows)[0]


def _gate_up(h, wg, wu):
    """One tile's gate and up projections, each rounded to h's dtype (weights already cast)."""
    return mm(h, wg, False).astype(h.dtype), mm(h, wu, False).astype(h.dtype)


def _swiglu_mlp_fwd(h, wg, wu, wd, rows):
    wgc, wuc, wdc = (w.astype(h.dtype) for w in (wg, wu, wd))
    y = map_rows(lambda ht: mm(swiglu(*_gate_up(ht, wgc, wuc)), wdc, False).astype(h.dtype), rows, h)
    return y, (h, wg, wu, wd)


def _swiglu_mlp_bwd(rows, res, dy):
    h, wg, wu, wd = res
    dt, bits = h.dtype, jax.lax.bitcast_convert_type
    wgc, wuc, wdc = (w.astype(dt) for w in (wg, wu, wd))
    N, D = h.shape

    def tile(acc, xs):  # one tile's dh, its weight gradients added to the float32 accumulators
        ht, dyt = (bits(x, dt) for x in xs)
        g, u = _gate_up(ht, wgc, wuc)
        da = mm(dyt, wdc, True).astype(dt)  # dy @ Wd.T
        dg, du = _swiglu_bwd((g, u), da)
        dh = (mm(dg, wgc, True) + mm(du, wuc, True)).astype(dt)
        acc = (acc[0] + tn_dot(ht, dg), acc[1] + tn_dot(ht, du), acc[2] + tn_dot(dyt, swiglu(g, u)))
        return acc, bits(dh, jnp.uint16)

    # tiles cross the loop as uint16 bits (see map_rows); Wd's gradient is accumulated as [D, F] (the narrower
    # operand is the one transposed, as in weight_grad) and transposed once
    acc = tuple(jnp.zeros((D, wg.shape[1]), jnp.float32) for _ in range(3))
    xs = tuple(bits(x, jnp.uint16).reshape(N // rows, rows, D) for x in (h, dy.astype(dt)))
    (dwg, dwu, dwd), dh = jax.lax.scan(tile, acc, xs)
    dwd = transpose_tiled(dwd) if tiles_ok(*dwd.shape) else dwd.T
    return bits(dh.reshape(N, D), dt), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)


swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
    """``silu(g) * u``, computed in float32 and rounded once to g's dtype; the backward likewise.

    Written out because XLA:CPU has no bf16 arithmetic: ``jax.nn.silu(g) * u`` on bf16 arrays rounds after each of
    its five ops (negate, exp, add, divide, multiply), a chain of conversions that made this elementwise fusion
    ~9 ms per SmolLM2 layer at 16 x 256 tokens, and autodiff's backward another such chain. torch autocast rounds
    twice (silu, then the product); this rounds once."""
    gf = g.astype(jnp.float32)
    return (gf / (1.0 + jnp.exp(-gf)) * u.astype(jnp.float32)).astype(g.dtype)


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dy):
    g, u = res
    gf, uf, d = g.astype(jnp.float32), u.astype(jnp.float32), dy.astype(jnp.float32)
    s = 1.0 / (1.0 + jnp.exp(-gf))
    du = d * gf * s
    dg = d * uf * s * (1.0 + gf * (1.0 - s))  # d silu / dg = s (1 + g (1 - s))
    return dg.astype(g.dtype), du.astype(u.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
