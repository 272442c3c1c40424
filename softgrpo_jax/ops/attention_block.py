"""The fused whole-sequence attention of a layer for 16-bit compute on single-device XLA:CPU: query / key / value
projections, RoPE and GQA attention in one custom VJP over tiles of batch rows, flash-style (the backward recomputes
the weights from saved log-sum-exps). Elsewhere the compilers fuse the plain path well."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.attention import (attention_grads, attention_probs_lse, attention_tiles, group_queries,
                                        heads_major, query_tile, swap_last2, ungroup_queries)
from softgrpo_jax.ops.matmul import mm, tn_dot
from softgrpo_jax.ops.residuals import ATTENTION_SAVED, named_residual
from softgrpo_jax.ops.rope import apply_rope, rope_transpose
from softgrpo_jax.ops.tiling import from_bits, map_rows, to_bits
from softgrpo_jax.ops.tuning import cpu_single_device, tuning


def attention_block_on(h: jax.Array) -> bool:
    """Whether a layer runs its whole-sequence attention as ``attention_block``: 16-bit compute on single-device
    XLA:CPU (elsewhere the compilers fuse the plain path well, and a loop over batch tiles would fight GSPMD's batch
    sharding)."""
    return (tuning().attention_block and h.dtype.itemsize == 2 and jnp.issubdtype(h.dtype, jnp.floating)
            and cpu_single_device())


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def attention_block(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static):
    """A layer's causal self-attention from its normed input h [B, T, D] (16-bit) to the attention output
    [B, T, H*hd] before the output projection: query / key / value projections (biases optional, None), RoPE
    (``cos`` / ``sin`` [B, T, hd]), GQA attention under ``mask`` [B, T, T] (causal in slot order), over tiles of
    batch rows as ``attention_core`` tiles them (``attention_tiles``). ``static`` = (H, Hkv, hd, scale, mark);
    ``mark`` names the saved output and statistics for ``forward``'s checkpoint policies (``ATTENTION_SAVED``).

    The forward is the plain path's arithmetic with its roundings (each projection rounded to h's dtype, RoPE in
    float32 rounded once, ``attention_probs_out``; the three projections run as one GEMM, whose float32 sums may
    come in another order), tile by tile, and it saves only h, the output (16-bit) and each query row's log-sum-exp
    (float32). The backward
    recomputes a tile's queries, keys and values from h and its softmax weights as exp(s - lse), as flash attention
    does: under remat the recomputed layer forward then skips the attention altogether (the output is saved), and
    without remat the residuals shrink from the weights [B, H, T, T] to [B, H, T]. Per tile it takes delta =
    rowsum(dO * O) from the saved 16-bit output (the forward-only path uses the float32 one), runs
    ``attention_grads``, the RoPE transpose in float32, and h's gradient as one float32 sum of the three projections'
    terms rounded once (autodiff rounds each and adds in 16 bits); the weight and bias gradients accumulate over the
    tiles in float32 and are returned in each parameter's dtype. A query row with no visible key (left padding)
    outputs the mean of its tile's values, as ``attention_core`` does, and passes no gradient."""
    return _attention_block_fwd(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static)[0]


def _block_tiles(h, static, S):
    H, T = static[0], h.shape[1]
    return attention_tiles(h.shape[0], T, S, H * T * S * 4, True)


def _block_params(wq, wk, wv, bq, bk, bv, dt):
    """The three projections as one [D, (H + 2 Hkv) hd] weight in ``dt`` (one GEMM per tile instead of three) and
    one float32 bias (None without biases)."""
    w = jnp.concatenate([x.astype(dt) for x in (wq, wk, wv)], axis=1)
    if bq is None and bk is None and bv is None:
        return w, None
    return w, jnp.concatenate([jnp.zeros(x.shape[1], jnp.float32) if y is None else y.astype(jnp.float32)
                               for x, y in ((wq, bq), (wk, bk), (wv, bv))])


def _block_qkv(ht, ct, st, w, b, static):
    """One batch tile's queries [b, Hkv, G*T, hd] (head k*G + g of position t at row g*T + t), keys and values
    [b, Hkv, T, hd], with the plain path's roundings (``w``, ``b``: ``_block_params``)."""
    H, Hkv, hd = static[:3]
    bt, T, D = ht.shape
    y = mm(ht.reshape(bt * T, D), w, False)
    if b is not None:
        y = y + b
    y = y.astype(ht.dtype).reshape(bt, T, H + 2 * Hkv, hd)
    k = apply_rope(y[:, :, H:H + Hkv], ct, st)
    return group_queries(apply_rope(y[:, :, :H], ct, st), Hkv), heads_major(k), heads_major(y[:, :, H + Hkv:])


def _block_fwd_tile(ht, ct, st, mt, w, b, static, tq):
    """One batch tile's attention output [b, T, H*hd] (h's dtype) and log-sum-exp [b, Hkv, G*T]."""
    H, Hkv, hd, scale = static[:4]
    G, (bt, T) = H // Hkv, ht.shape[:2]
    qg, kt, vt = _block_qkv(ht, ct, st, w, b, static)
    outs, lses = [], []
    for j in range(T // tq):
        end = (j + 1) * tq  # causal: the keys up to this tile's last query
        _, o, lse = attention_probs_lse(query_tile(qg, j, tq, T), kt[:, :, :end], vt[:, :, :end],
                                         mt[:, j * tq:end, :end], scale)
        outs.append(o.astype(ht.dtype).reshape(bt, Hkv, G, tq, hd))
        lses.append(lse.reshape(bt, Hkv, G, tq))
    o = ungroup_queries(jnp.concatenate(outs, axis=3).reshape(bt, Hkv, G * T, hd), T).reshape(bt, T, H * hd)
    return o, jnp.concatenate(lses, axis=3).reshape(bt, Hkv, G * T)


def _attention_block_fwd(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static):
    w, b = _block_params(wq, wk, wv, bq, bk, bv, h.dtype)
    bb, tq = _block_tiles(h, static, mask.shape[2])
    o, lse = map_rows(lambda ht, ct, st, mt: _block_fwd_tile(ht, ct, st, mt, w, b, static, tq), bb,
                       h, cos, sin, mask)
    if static[4]:
        o, lse = named_residual(o, ATTENTION_SAVED), named_residual(lse, ATTENTION_SAVED)
    return o, (h, wq, wk, wv, bq, bk, bv, cos, sin, mask, o, lse)


def _attention_block_bwd(static, res, do):
    h, wq, wk, wv, bq, bk, bv, cos, sin, mask, o, lse = res
    H, Hkv, hd, scale = static[:4]
    f32, dt, G = jnp.float32, h.dtype, H // Hkv
    B, T, D = h.shape
    w, b = _block_params(wq, wk, wv, bq, bk, bv, dt)
    bb, tq = _block_tiles(h, static, mask.shape[2])
    refs = (h, cos, sin, mask, o, lse, do.astype(dt))

    def tile(acc, xs):  # one batch tile's dh; its weight and bias gradients added to the float32 accumulators
        ht, ct, st, mt, ot, lt, dot_ = (from_bits(x, r) for x, r in zip(xs, refs))
        qg, kt, vt = _block_qkv(ht, ct, st, w, b, static)
        dog, og = (group_queries(a.reshape(bb, T, H, hd), Hkv) for a in (dot_, ot))
        delta = jnp.sum(dog.astype(f32) * og.astype(f32), axis=-1, keepdims=True)
        lt = lt.reshape(bb, Hkv, G, T)

        def weights(j):  # query tile j's softmax weights, recomputed
            end = (j + 1) * tq
            s = jnp.einsum("bkqh,bksh->bkqs", query_tile(qg, j, tq, T) * jnp.asarray(scale, dt), kt[:, :, :end],
                           preferred_element_type=f32).reshape(bb, Hkv, G, -1, end)
            p = jnp.where(mt[:, None, None, j * tq:end, :end], jnp.exp(s - lt[:, :, :, j * tq:end, None]), 0)
            return p.astype(dt).reshape(bb, Hkv, -1, end)

        dq, dkt, dvt = attention_grads(qg, kt, vt, weights, delta, dog, scale, T, tq)
        dq = rope_transpose(ungroup_queries(dq, T), ct[:, :, None], st[:, :, None])  # [b, T, H, hd]
        dq = dq.astype(dt).reshape(bb * T, H * hd)
        dk = swap_last2(dkt).transpose(0, 2, 1, 3)  # [b, T, Hkv, hd]
        dk = rope_transpose(dk, ct[:, :, None], st[:, :, None]).astype(dt).reshape(bb * T, Hkv * hd)
        dv = swap_last2(dvt).transpose(0, 2, 1, 3).astype(dt).reshape(bb * T, Hkv * hd)
        dy = jnp.concatenate([dq, dk, dv], axis=1)  # [b*T, (H + 2 Hkv) hd]: the gradient of the joint projection
        dh = mm(dy, w, True).astype(dt)
        acc_w = acc[0] + tn_dot(ht.reshape(bb * T, D), dy)
        acc_b = None if acc[1] is None else acc[1] + jnp.sum(dy.astype(f32), axis=0)
        return (acc_w, acc_b), to_bits(dh.reshape(bb, T, D))

    zeros = (jnp.zeros(w.shape, f32), None if b is None else jnp.zeros(b.shape, f32))
    xs = tuple(to_bits(x).reshape((B // bb, bb) + x.shape[1:]) for x in refs)
    (dw, db), dh = jax.lax.scan(tile, zeros, xs)
    split = [wq.shape[1], wq.shape[1] + wk.shape[1]]
    dws = tuple(g.astype(x.dtype) for g, x in zip(jnp.split(dw, split, axis=1), (wq, wk, wv)))
    dbs = tuple(None if x is None else g.astype(x.dtype)
                for g, x in zip((None,) * 3 if db is None else jnp.split(db, split), (bq, bk, bv)))
    return (from_bits(dh.reshape(B, T, D), h),) + dws + dbs + (None, None, None)


attention_block.defvjp(_attention_block_fwd, _attention_block_bwd)
