"""GEMMs for the model's weights: the mixed-precision matmul with a written-out backward, and the tiled transposes
that keep XLA:CPU's bf16 weight-gradient GEMMs on its fast path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.tuning import cpu_single_device, tiles_ok


def dense(x, w, b=None):
    # a 2-D GEMM ([B*T, D] x [D, F]): its weight gradient is then one GEMM too; XLA:CPU runs the
    # two-batch-dim contraction of "btd,btf->df" several times slower
    lead = x.shape[:-1]
    y = matmul(x.reshape(-1, x.shape[-1]), w)
    y = y.reshape(lead + (w.shape[-1],))
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """``x @ w`` (or ``x @ w.T``) for x [N, D] in the compute dtype and a weight w of any dtype (cast to x's):
    float32 result, float32 accumulation.

    With 16-bit x, the backward pass is written out (``_matmul16``) the way mixed-precision training does it
    (torch autocast, MaxText): the output cotangent is cast to x's dtype, so both gradient GEMMs run in bf16 with
    float32 accumulation, and the weight gradient is returned in the weight's own dtype straight from the float32
    accumulator (a float32 master weight gets an unrounded gradient). Plain autodiff would instead multiply the
    float32 cotangent by the bf16 operands, i.e. two float32 GEMMs."""
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return _matmul16(x, w, transpose_w)
    return mm(x, w.astype(x.dtype), transpose_w)


def mm(a, b, transpose_b):
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile(n: int) -> int:
    """The largest power of two <= 64 that divides n."""
    t = 64
    while n % t:
        t //= 2
    return t


def tn_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` for a [N, M], b [N, K] (the weight gradient: both operands' token dim contracted), float32.

    On XLA:CPU (jax 0.10) a bf16 dot runs on its fast AMX / YNNPACK path only when the contracting dim of its left
    operand is physically innermost; otherwise the whole GEMM is converted to float32 (230 against 820 GFLOP/s
    here, benchmarks/RESULTS.md). A plain ``a.T`` (or a copy, or an optimisation barrier) is folded back into the
    dot's dimension numbers before that check, and XLA:CPU's 2-D transpose runs at ~0.5 GB/s. So ``a.T`` is built
    in two tiled steps ([N/bn, bn, M/bm, bm] -> [M/bm, N/bn, bm, bn] -> [M/bm, bm, N/bn, bn] = [M, N]), on the
    uint16 bits (XLA:CPU computes bf16 data movement in float32): each step moves whole tiles, 20x faster than the
    2-D transpose, and the dot sees a row-major [M, N] operand. N is zero-padded to a multiple of 8 when needed
    (zero rows add nothing). Other backends get ``a.T`` (their GEMMs take any layout)."""
    if not cpu_single_device() or a.dtype.itemsize != 2 or a.shape[1] % 8:
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if a.shape[0] % 8:
        pad = 8 - a.shape[0] % 8
        a = jnp.pad(a, ((0, pad), (0, 0)))
        b = jnp.pad(b, ((0, pad), (0, 0)))
    return jnp.dot(transpose_tiled(a), b, preferred_element_type=jnp.float32)


def weight_grad(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` (a [N, M], b [N, K]) as ``tn_dot``, but tiled-transposing the narrower operand: when K < M,
    ``(b.T @ a).T``, whose transposes move b [N, K] and the [K, M] result instead of a [N, M].

    The tied LM head (a = g [N, V], b = x [N, D]): 0.42 s against 0.56 s for SmolLM2's at 16 x 256 tokens. The MLP's
    down projection (a = the SwiGLU output [N, F], b = g [N, D]): besides moving less, the SwiGLU output, which remat
    recomputes, is no longer fused into a transposing copy, where XLA:CPU evaluated it in strided order (8 ms per
    SmolLM2 layer with a bf16 silu, 61 ms with the float32 one; this way ~2 ms)."""
    if b.shape[1] < a.shape[1] and tiles_ok(*a.shape, b.shape[1]):
        return transpose_tiled(tn_dot(b, a))
    return tn_dot(a, b)


def transpose_tiled(a: jax.Array) -> jax.Array:
    """``a.T`` of a 2-D array with both dims multiples of 8, in two tiled steps on the raw bits (see ``tn_dot``)."""
    N, M = a.shape
    bn, bm = _tile(N), _tile(M)
    utype = {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type
    u = bits(a, utype).reshape(N // bn, bn, M // bm, bm).transpose(2, 0, 3, 1)
    return bits(u.transpose(0, 2, 1, 3).reshape(M, N), a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul16(x, w, transpose_w):
    return mm(x, w.astype(x.dtype), transpose_w)


def _matmul16_fwd(x, w, transpose_w):
    return mm(x, w.astype(x.dtype), transpose_w), (x, w)


def _matmul16_bwd(transpose_w, res, g):
    x, w = res
    g = g.astype(x.dtype)  # [N, F]
    dx = mm(g, w.astype(x.dtype), not transpose_w).astype(x.dtype)  # g @ w.T (or g @ w)
    dw = weight_grad(g, x) if transpose_w else weight_grad(x, g)  # [F, D] = g.T @ x, or [D, F] = x.T @ g
    return dx, dw.astype(w.dtype)


_matmul16.defvjp(_matmul16_fwd, _matmul16_bwd)
