"""``log_softmax(h W / temperature)[targets]`` over a vocabulary-wide head without materialising [B, T, V] logits:
the needed positions in chunks of rows, each chunk's logits in vocabulary blocks on single-device XLA:CPU, and a
written-out backward that recomputes each block's logits from the forward's saved log-sum-exp (the blockwise loss of
levanter and MaxText's vocabulary tiling)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softgrpo_jax.distributed import current_activation_mesh
from softgrpo_jax.ops.matmul import mm, tn_dot
from softgrpo_jax.ops.tuning import cpu_single_device, tuning


def vocab_block(vocab_size: int) -> int:
    """Vocabulary columns per block of ``vocab_logprobs``: ``Tuning.vocab_block``'s on single-device XLA:CPU when the
    vocabulary is wider, else the whole vocabulary."""
    block = tuning().vocab_block
    if block and cpu_single_device() and vocab_size > block[1]:
        return block[1]
    return vocab_size


def vocab_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk of ``vocab_logprobs``: ``chunk_size`` if given; else with vocabulary blocks (``Tuning.vocab_block``)
    its rows, otherwise ~``Tuning.vocab_chunk_bytes`` of float32 logits (a multiple of 8, between 64 and 4096)."""
    if chunk_size:
        return int(chunk_size)
    if vocab_block(vocab_size) < vocab_size:
        return tuning().vocab_block[0]
    return max(64, min(4096, tuning().vocab_chunk_bytes // (4 * vocab_size) // 8 * 8))


def vocab_logprobs(h: jax.Array, w: jax.Array, targets: jax.Array, need: jax.Array, *, vocab_major: bool,
                   compute_dtype, temperature=1.0, chunk_size: int | None = None) -> jax.Array:
    """``log_softmax(h W / temperature)[targets]`` where ``need``, 0 elsewhere, computing the vocabulary-wide logits
    only for (about) the positions that need them.

    h [B, T, D] normed hidden states, w the head weight ([V, D] if ``vocab_major``, the tied embedding, else
    [D, V]), targets [B, T] int, need [B, T] bool -> [B, T] float32. GEMMs run in ``compute_dtype`` with float32
    accumulation.

    The needed positions are moved to the front (a stable sort, per batch row under a multi-device mesh so the
    batch stays sharded; over the flattened batch otherwise) and processed in chunks of ``vocab_chunk_rows`` rows
    by a loop that runs only as many chunks as hold needed positions: only [rows, V] logits (on single-device
    XLA:CPU [rows, block] ones, see ``Tuning.vocab_block``) are ever live, and a batch with no needed position (a
    SofT-GRPO batch whose scored steps are all soft) never touches the vocabulary.
    Forward and backward are written out (``_vocab_lp``): the forward combines the blocks' log-sum-exps
    (``logsumexp_rows``); the backward recomputes each block's logits, forms ``(onehot - softmax) * g /
    temperature`` with the softmax as exp(logits - lse) from the forward's saved log-sum-exp, and writes the
    head's gradient block by block (accumulated over the chunks in float32)."""
    B, T, D = h.shape
    vocab_size = w.shape[0] if vocab_major else w.shape[1]
    mesh = current_activation_mesh()
    per_row = mesh is not None and mesh.size > 1
    if not per_row:  # one sort over all positions: chunks pack needed positions of every row
        h, targets, need = h.reshape(1, B * T, D), targets.reshape(1, B * T), need.reshape(1, B * T)
    R, N = h.shape[:2]
    rows = vocab_chunk_rows(vocab_size, chunk_size)
    c = max(1, min(N, rows // R))  # positions per chunk and row
    order = jnp.argsort(~need, axis=1, stable=True)
    count = jnp.max(jnp.sum(need, axis=1))
    hs = jnp.take_along_axis(h, order[..., None], axis=1)
    ts = jnp.take_along_axis(targets.astype(jnp.int32), order, axis=1)
    n_chunks = -(-N // c)
    pad = n_chunks * c - N
    if pad:
        hs = jnp.pad(hs, ((0, 0), (0, pad), (0, 0)))
        ts = jnp.pad(ts, ((0, 0), (0, pad)))
    trips = (count + c - 1) // c
    static = (c, float(temperature), vocab_major, jnp.dtype(compute_dtype).name, vocab_block(vocab_size))
    lp_sorted = _vocab_lp(hs, w, ts, trips, static)[:, :N]
    inv = jnp.argsort(order, axis=1)
    lp = jnp.take_along_axis(lp_sorted, inv, axis=1)
    lp = jnp.where(need, lp, 0.0)
    return lp.reshape(B, T)


def _vocab_chunk(hs, i, c, *xs):
    """Chunk i's rows: hs [R, Np, D] -> x [R*c, D], and each [R, Np] array of ``xs`` -> [R*c]."""
    x = jax.lax.dynamic_slice_in_dim(hs, i * c, c, axis=1)
    return (x.reshape(-1, x.shape[-1]),) + tuple(jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1).reshape(-1)
                                                 for a in xs)


def _head_blocks(w, vd, vb, cd):
    """The head weight cast to ``cd`` and zero-padded to whole blocks of ``vb`` vocabulary entries (along axis 0 if
    ``vd``, the tied [V, D] embedding, else axis 1), with the vocabulary size and the block count."""
    V = w.shape[0] if vd else w.shape[1]
    wc = w.astype(cd)
    if V % vb:
        wc = jnp.pad(wc, ((0, -V % vb), (0, 0)) if vd else ((0, 0), (0, -V % vb)))
    return wc, V, -(-V // vb)


def _block_logits(x, wc, j, static, V):
    """Block j's float32 logits [rows, vb] of x [rows, D] (columns past the vocabulary -inf), and its weight."""
    _, temp, vd, _, vb = static
    wb = jax.lax.dynamic_slice_in_dim(wc, j * vb, vb, axis=0 if vd else 1) if wc.shape[0 if vd else 1] > vb else wc
    logits = mm(x, wb, vd) / temp
    if V % vb:
        logits = jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + j * vb < V, logits, -jnp.inf)
    return wb, logits


def _over_blocks(blk, nb, init):
    """``blk(j, carry)`` over the vocabulary blocks (called once, without a loop, for one block)."""
    return blk(0, init) if nb == 1 else jax.lax.fori_loop(0, nb, blk, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _vocab_lp(hs, w, ts, trips, static):
    return _vocab_lp_fwd(hs, w, ts, trips, static)[0]


def _vocab_lp_fwd(hs, w, ts, trips, static):
    c, temp, vd, cd, vb = static
    R, Np = ts.shape

    def run(_):
        wc, V, nb = _head_blocks(w, vd, vb, cd)

        def body(i, out):
            x, t = _vocab_chunk(hs, i, c, ts)
            x = x.astype(cd)

            def blk(j, carry):  # the running log-sum-exp and the target's logit (from the block holding it)
                lse, picked = carry
                _, logits = _block_logits(x, wc, j, static, V)
                tj = t - j * vb
                hit = (tj >= 0) & (tj < vb)
                at = jnp.take_along_axis(logits, jnp.clip(tj, 0, vb - 1)[:, None], axis=-1)[:, 0]
                return jnp.logaddexp(lse, logsumexp_rows(logits)), picked + jnp.where(hit, at, 0.0)

            lse, picked = _over_blocks(blk, nb, (jnp.full(t.shape, -jnp.inf), jnp.zeros(t.shape, jnp.float32)))
            return tuple(jax.lax.dynamic_update_slice_in_dim(o, a.reshape(R, c), i * c, axis=1)
                         for o, a in zip(out, (picked - lse, lse)))

        return jax.lax.fori_loop(0, trips, body, (jnp.zeros((R, Np), jnp.float32),) * 2)

    # no chunk to run (every scored step soft): not even the weight's cast (a [V, D] pass)
    out, lse = jax.lax.cond(trips > 0, run, lambda _: (jnp.zeros((R, Np), jnp.float32),) * 2, None)
    return out, (hs, w, ts, trips, lse)


def logsumexp_rows(x: jax.Array) -> jax.Array:
    """``logsumexp(x, axis=-1)`` of float32 [N, V] logits. On XLA:CPU the sum of the exponentials runs as a GEMV
    against ones: XLA fuses the exp into a YNNPACK reduction that ran at ~2 ns per element, while the exponentials
    written out and summed by the GEMV take half the time, at the price of one more [N, V] float32 buffer (a
    [680, 49152] chunk: 62 -> 30 ms, ``benchmarks/bench_cpu_lse.py --no-faults``; the GRPO update 1.10x)."""
    m = jnp.max(x, axis=-1)
    e = jnp.exp(x - m[:, None])
    if cpu_single_device():  # (sharded runs and other backends: the plain sum, as the other CPU-only paths)
        total = jnp.dot(e, jnp.ones((x.shape[-1],), x.dtype), preferred_element_type=jnp.float32)
    else:
        total = jnp.sum(e, axis=-1)
    return m + jnp.log(total)


def _vocab_lp_bwd(static, res, g):
    hs, w, ts, trips, lse = res

    def run(_):
        return _vocab_lp_bwd_loop(static, hs, w, ts, trips, g, lse)

    # nothing to do without a chunk: zeros, without the weight's cast
    dh, dw = jax.lax.cond(trips > 0, run, lambda _: (jnp.zeros_like(hs), jnp.zeros(w.shape, jnp.float32)), None)
    return dh, dw.astype(w.dtype), None, None


def _vocab_lp_bwd_loop(static, hs, w, ts, trips, g, lse):
    c, temp, vd, cd, vb = static
    wc, V, nb = _head_blocks(w, vd, vb, cd)
    R, Np, D = hs.shape
    axis = 0 if vd else 1  # the head's gradient is laid out as the weight: [V, D] (tied) or [D, V]
    g = g / temp

    def body(i, carry):
        dh, dw = carry
        x, t, gc, lc = _vocab_chunk(hs, i, c, ts, g, lse)
        x = x.astype(cd)

        def blk(j, carry):  # block j's share of dx, its slice of the head's gradient
            dx, dw = carry
            wb, logits = _block_logits(x, wc, j, static, V)
            # the softmax from the forward's log-sum-exp: one elementwise pass, no max / sum reductions
            p = jnp.exp(logits - lc[:, None])
            onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + j * vb == t[:, None]
            gl = (gc[:, None] * (onehot.astype(jnp.float32) - p)).astype(cd)  # d lp / d (x W), cast as _matmul16's
            dx = dx + mm(gl, wb, not vd)
            dwb = tn_dot(gl, x) if vd else tn_dot(x, gl)
            if nb == 1:
                return dx, dw + dwb
            old = jax.lax.dynamic_slice_in_dim(dw, j * vb, vb, axis=axis)
            return dx, jax.lax.dynamic_update_slice_in_dim(dw, old + dwb, j * vb, axis=axis)

        dx, dw = _over_blocks(blk, nb, (jnp.zeros((x.shape[0], D), jnp.float32), dw))
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dx.astype(hs.dtype).reshape(R, c, D), i * c, axis=1)
        return dh, dw

    dh, dw = jax.lax.fori_loop(0, trips, body, (jnp.zeros_like(hs), jnp.zeros(wc.shape, jnp.float32)))
    return dh, jax.lax.slice_in_dim(dw, 0, V, axis=axis)


_vocab_lp.defvjp(_vocab_lp_fwd, _vocab_lp_bwd)
