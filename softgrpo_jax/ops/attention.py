"""Attention over a whole sequence or a KV cache, behind one dispatcher (:func:`resolve`): "cudnn" (flash attention
through ``jax.nn.dot_product_attention``, for 16-bit compute on NVIDIA GPUs), "splash" (JAX's splash attention
Pallas kernel, TPU; Pallas interpret mode elsewhere, for tests) or "xla" (GQA as batched GEMMs with a written-out,
flash-style backward; on single-device XLA:CPU tiled over batch rows and causal query tiles).

Layout: queries grouped as [B, Hkv, G*T, hd] (query head k*G + g of position t at row g*T + t), keys and values
[B, Hkv, S, hd], so every dot and its gradients is a plain batched GEMM on XLA:CPU and GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from softgrpo_jax.distributed import BATCH_AXES
from softgrpo_jax.ops.residuals import named_residual
from softgrpo_jax.ops.tiling import map_rows
from softgrpo_jax.ops.tuning import cpu_single_device, tuning

IMPLS = ("auto", "xla", "cudnn", "splash")


def resolve(impl: str, dtype, head_dim: int) -> str:
    """``impl`` ("auto" | "xla" | "cudnn" | "splash") -> the path a whole-sequence pass takes. auto: splash
    attention on TPU; cuDNN flash attention for bf16 / f16 compute on an NVIDIA GPU with a head dim cuDNN takes (a
    multiple of 8, at most 128); else the XLA path."""
    if impl not in IMPLS:
        raise ValueError(f"attention must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() == "tpu":
        return "splash"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8 or head_dim > 128:
        return "xla"
    try:
        dev = jax.devices()[0]
        cuda = dev.platform == "gpu" and "cuda" in dev.client.platform_version.lower()
    except Exception:  # noqa: BLE001 - no backend details: stay on the portable path
        cuda = False
    return "cudnn" if cuda else "xla"


NEG_INF = -1e30


def attention_dpa(q, k, v, seqlen, scale):
    """Causal attention through ``jax.nn.dot_product_attention`` for rows whose real tokens come first
    (``seqlen`` [B] of them, None: all). q [B, T, H, hd], k / v [B, T, Hkv, hd] -> [B, T, H, hd]; rows past a
    row's length are zeroed (cuDNN leaves them undefined, and they must not reach a weight gradient)."""
    o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=seqlen,
                                     key_value_seq_lengths=seqlen, implementation=tuning().dpa_implementation)
    if seqlen is not None:
        valid = jnp.arange(q.shape[1])[None, :] < seqlen[:, None]
        o = jnp.where(valid[:, :, None, None], o, jnp.zeros((), o.dtype))
    return o


def attention_probs_out(qg, kt, vt, mask, scale):
    """GQA attention as batched GEMMs. qg [B, Hkv, G*T, hd] (query head k*G + g of position t at row g*T + t),
    kt / vt [B, Hkv, S, hd], mask [B, T, S] -> (the softmax weights in the compute dtype [B, Hkv, G*T, S], the
    float32 output [B, Hkv, G*T, hd]). The scale is applied to the queries ([.., hd], not the [.., S] scores)."""
    return attention_probs_lse(qg, kt, vt, mask, scale)[:2]


def attention_probs_lse(qg, kt, vt, mask, scale):
    """``attention_probs_out`` and each query row's log-sum-exp of its scaled scores (float32 [B, Hkv, G*T]; +inf
    for a row with no visible key, so that weights recomputed as exp(s - lse) are 0 there)."""
    B, Hkv, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    s = jnp.einsum("bkqh,bksh->bkqs", qg * jnp.asarray(scale, qg.dtype), kt, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None, :, :], s.reshape(B, Hkv, GT // T, T, S), NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    w = (e / total).astype(qg.dtype).reshape(B, Hkv, GT, S)
    lse = jnp.where(m > NEG_INF / 2, m + jnp.log(total), jnp.inf).reshape(B, Hkv, GT)
    return w, jnp.einsum("bkqs,bksh->bkqh", w, vt, preferred_element_type=jnp.float32), lse


def group_queries(x: jax.Array, Hkv: int) -> jax.Array:
    """Queries [B, T, H, hd] -> [B, Hkv, G*T, hd], query head k*G + g of position t at row g*T + t (GQA as batched
    GEMMs with one contracting dim each: query head k*G + g uses KV head k)."""
    B, T, H, hd = x.shape
    return x.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, H * T // Hkv, hd)


def ungroup_queries(x: jax.Array, T: int) -> jax.Array:
    """The inverse of ``group_queries``: [B, Hkv, G*T, hd] -> [B, T, H, hd]."""
    B, Hkv, GT, hd = x.shape
    return x.reshape(B, Hkv, GT // T, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * GT // T, hd)


def heads_major(x: jax.Array) -> jax.Array:
    """[B, T, N, hd] -> [B, N, T, hd] as a real copy: with T split first, XLA cannot fold the transpose into the
    consuming dot's dimension numbers, where XLA:CPU would find a batched dot it does not run in bf16 and convert
    the dot to float32 (measured: every attention dot of the update)."""
    B, T, N, hd = x.shape
    s = math.gcd(T, 8)
    return x.reshape(B, T // s, s, N, hd).transpose(0, 3, 1, 2, 4).reshape(B, N, T, hd)


def swap_last2(x: jax.Array) -> jax.Array:
    """[..., M, N] -> [..., N, M] as a real copy (``heads_major`` on a [prod(...), M, N, 1] view)."""
    *lead, M, N = x.shape
    return heads_major(x.reshape(-1, M, N, 1)).reshape(*lead, N, M)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attention_core(qg, kt, vt, mask, scale, mark=False, causal=False):
    """``attention_probs_out``'s output in the compute dtype, with the backward written out flash-style: the
    softmax gradient takes its row term from delta = rowsum(dO * O) ([.., G*T, hd]) instead of autodiff's
    rowsum(dW * W) over the [.., G*T, S] weights (on XLA:CPU that reduction alone was 0.95 s of a 12 s
    SmolLM2 update), the scale is applied to [.., hd] arrays only, and every GEMM takes compute-dtype operands
    with float32 accumulation, in layouts XLA:CPU runs as bf16 GEMMs (the key / value gradients as
    dK^T = Q^T dS and dV^T = dO^T W: no GEMM contracts the rows of both operands). ``mark``: name the residuals
    for ``forward``'s checkpoint policy (``RESIDUAL``). ``causal``: the mask is causal in slot order (S == T)
    at least; on XLA:CPU the work is then tiled (see ``attention_tiles``)."""
    return _attention_core_fwd(qg, kt, vt, mask, scale, mark, causal)[0]


def attention_tiles(B: int, T: int, S: int, row_bytes: int, causal: bool) -> tuple[int, int]:
    """(batch rows per tile, query positions per tile) for ``attention_core``. On XLA:CPU the attention is
    bound by moving its [.., G*T, S] scores and weights through memory (~10 passes); a loop over tiles of a few
    batch rows keeps each tile's arrays in cache, and with a causal mask each query tile only touches the keys up
    to its end (positions tiled by 64: 5/8 of the score elements at T = 256). One SmolLM2 layer's attention
    forward + backward (16 x 256 tokens): 74 -> 54 ms (benchmarks/bench_cpu_attention.py). Elsewhere, and under
    a multi-device mesh (a loop over batch rows would fight GSPMD's batch sharding): one tile. A query row with no
    visible key (left padding) then averages the values of its tile's keys instead of all S: such rows never
    reach a real position's output, and no cotangent reaches them."""
    if tuning().attention_tiles:
        return tuning().attention_tiles
    if not cpu_single_device():
        return B, T
    tq = 64 if causal and S == T and T % 64 == 0 and T >= 128 else T
    bb = 1
    for d in range(1, B + 1):  # the most batch rows whose float32 scores stay within ~8 MB
        if B % d == 0 and d * row_bytes <= 8 << 20:
            bb = d
    return bb, tq


def query_tile(x, j, tq, T):
    """Rows of query positions [j*tq, (j+1)*tq) of a [b, Hkv, G*T, ...] array (row g*T + t)."""
    b, k, GT = x.shape[:3]
    x5 = x.reshape((b, k, GT // T, T) + x.shape[3:])[:, :, :, j * tq:(j + 1) * tq]
    return x5.reshape((b, k, (GT // T) * tq) + x.shape[3:])


def _attention_fwd_tile(qg, kt, vt, mask, scale, tq):
    """One batch tile's attention: (float32 output [b, Hkv, G*T, hd], the weights per query tile)."""
    T = mask.shape[1]
    if tq >= T:
        w, o = attention_probs_out(qg, kt, vt, mask, scale)
        return o, (w,)
    b, k, GT, hd = qg.shape
    outs, ws = [], []
    for j in range(T // tq):
        end = (j + 1) * tq  # causal: the keys up to this tile's last query
        w, o = attention_probs_out(query_tile(qg, j, tq, T), kt[:, :, :end], vt[:, :, :end],
                                    mask[:, j * tq:end, :end], scale)
        outs.append(o.reshape(b, k, GT // T, tq, hd))
        ws.append(w)
    return jnp.concatenate(outs, axis=3).reshape(b, k, GT, hd), tuple(ws)


def _attention_bwd_tile(qg, kt, vt, ws, o, do, scale, T, tq):
    """One batch tile's (dQ, dK, dV) from the forward's weights ``ws`` (per query tile) and float32 output."""
    do = do.astype(qg.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1, keepdims=True)  # rowsum(dW * W) = dO . O
    dq, dkt, dvt = attention_grads(qg, kt, vt, lambda j: ws[j], delta, do, scale, T, tq)
    return dq.astype(qg.dtype), swap_last2(dkt).astype(kt.dtype), swap_last2(dvt).astype(vt.dtype)


def attention_grads(qg, kt, vt, weights, delta, do, scale, T, tq):
    """float32 (dQ [b, Hkv, G*T, hd], dK^T and dV^T [b, Hkv, hd, S]) of one batch tile, query tile by query tile
    (``tq``; causal: tile j sees the keys up to its end), from ``weights(j)`` (tile j's softmax weights in the
    compute dtype), delta = rowsum(dO * O) [b, Hkv, G*T, 1] and dO in the compute dtype."""
    f32, dt = jnp.float32, qg.dtype

    def grads(q, do_, delta_, w, k, v):
        dw = jnp.einsum("bkqh,bksh->bkqs", do_, v, preferred_element_type=f32)
        ds = (w.astype(f32) * (dw - delta_)).astype(dt)  # dS / scale
        dq = jnp.einsum("bkqs,bksh->bkqh", ds, k, preferred_element_type=f32) * scale
        dkt = jnp.einsum("bkhq,bkqs->bkhs", swap_last2(q), ds, preferred_element_type=f32) * scale
        dvt = jnp.einsum("bkhq,bkqs->bkhs", swap_last2(do_), w, preferred_element_type=f32)
        return dq, dkt, dvt

    if tq >= T:
        return grads(qg, do, delta, weights(0), kt, vt)
    b, k, GT, hd = qg.shape
    S = kt.shape[2]
    dqs, dkt, dvt = [], jnp.zeros((b, k, hd, S), f32), jnp.zeros((b, k, hd, S), f32)
    for j in range(T // tq):
        end = (j + 1) * tq
        dq_j, dk_j, dv_j = grads(*(query_tile(a, j, tq, T) for a in (qg, do, delta)), weights(j),
                                 kt[:, :, :end], vt[:, :, :end])
        dqs.append(dq_j.reshape(b, k, GT // T, tq, hd))
        dkt = dkt.at[..., :end].add(dk_j)
        dvt = dvt.at[..., :end].add(dv_j)
    return jnp.concatenate(dqs, axis=3).reshape(b, k, GT, hd), dkt, dvt


def _attention_core_fwd(qg, kt, vt, mask, scale, mark, causal):
    B, k, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    bb, tq = attention_tiles(B, T, S, k * GT * S * 4, causal)
    o, ws = map_rows(lambda q, kk, v, m: _attention_fwd_tile(q, kk, v, m, scale, tq), bb, qg, kt, vt, mask)
    ws, o = jax.lax.optimization_barrier((ws, o))  # keep them: XLA would otherwise recompute O inside the backward
    res = (qg, kt, vt, ws, o)
    if mark:
        res = jax.tree.map(named_residual, res)
    return o.astype(qg.dtype), res[:3] + (mask,) + res[3:]


def _attention_core_bwd(scale, mark, causal, res, do):
    qg, kt, vt, mask, ws, o = res
    B, k, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    bb, tq = attention_tiles(B, T, S, k * GT * S * 4, causal)
    dq, dk, dv = map_rows(lambda q, kk, v, w, o_, d: _attention_bwd_tile(q, kk, v, w, o_, d, scale, T, tq), bb,
                           qg, kt, vt, ws, o, do)
    return dq, dk, dv, None


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# --------------------------------------------------------------------------------------------- splash attention
SPLASH_BLOCKS = (512, 256, 128)


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, G: int, block: int, interpret: bool):
    """JAX's splash attention for one KV head's G query heads (MQA form) under a causal mask over T positions."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * G)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, built once (cached), not traced
        return sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def attention_splash(q, k, v, segment_ids, scale):
    """Causal GQA attention through JAX's splash attention kernel: q [B, T, H, hd], k / v [B, T, Hkv, hd],
    ``segment_ids`` [B, T] int32 (a position attends to earlier positions of its own segment: 0 for padding, 1 for
    a row's real tokens, 1, 2, ... for rows packed into one sequence) -> [B, T, H, hd] in q's dtype.

    The kernel runs per batch row and KV head (``vmap``), its G query heads in the kernel's MQA form; T is padded to
    a multiple of 128 (padding in a segment of its own). On TPU it is the compiled Mosaic kernel; elsewhere Pallas
    interpret mode (slow: for tests against the XLA path). A query that sees no key of its segment cannot occur
    (a position always sees itself)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    Tp = -(-T // 128) * 128
    seg = segment_ids.astype(jnp.int32)
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, Tp - T)), constant_values=-1)
    block = next(b for b in SPLASH_BLOCKS if Tp % b == 0)
    kernel = _splash_kernel(Tp, G, block, jax.default_backend() != "tpu")
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, Tp, Hkv, G, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    per_head = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s), in_axes=(0, 0, 0, None))
    run = lambda a, b, c, s: jax.vmap(per_head)(a, b, c, sk.SegmentIds(q=s, kv=s))  # noqa: E731
    heads = P(BATCH_AXES, "tensor", None, None, None)  # [B, Hkv, (G,) T, hd]: a device's rows and KV heads
    o = local_shards(run, (qh, kh, vh, seg), (heads, heads[:4], heads[:4], P(BATCH_AXES, None)), heads,
                     ref=1)  # [B, Hkv, G, T, hd]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, hd)[:, :T].astype(q.dtype)


def local_shards(fn, args, specs, out_spec, ref: int = 0):
    """``fn(*args)`` on each device's own shards when traced under a multi-device
    :func:`softgrpo_jax.distributed.activation_sharding` mesh (``jax.shard_map``), else as is. For Pallas kernels:
    a ``pallas_call`` has no SPMD partitioning rule, so under a sharded jit XLA would gather its operands whole onto
    every device (inside a decode loop: the whole KV cache, every step). ``specs`` / ``out_spec``: PartitionSpecs
    over the batch axes and "tensor"; axes that do not divide ``args[ref]``'s dims are dropped from every spec
    alike (those dims replicated), so the shards stay consistent."""
    from softgrpo_jax.distributed import current_activation_mesh, fit_spec

    mesh = current_activation_mesh()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    fitted = fit_spec(args[ref].shape, specs[ref], mesh)
    keep = {}  # the axes each named entry of the reference spec keeps after fitting
    for want, got in zip(specs[ref], fitted):
        if want is not None:
            keep[want if isinstance(want, str) else tuple(want)] = got

    def fit(spec):
        return P(*(None if e is None else keep.get(e if isinstance(e, str) else tuple(e), None) for e in spec))

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(fit(s) for s in specs), out_specs=fit(out_spec),
                         check_vma=False)(*args)


# ------------------------------------------------------------------------------------------- decode attention
def _splits(S: int) -> tuple[int, int]:
    """(k_splits, block_k) for the Pallas decode kernel over S cache slots: as many splits (up to 16) as leave
    each a multiple of 16 slots, and the largest block (up to 128) dividing a split."""
    for ks in (16, 8, 4, 2, 1):
        if S % ks == 0 and (S // ks) % 16 == 0:
            split = S // ks
            return ks, next(b for b in (128, 64, 32, 16) if split % b == 0)
    raise ValueError(f"decode attention needs a cache length that is a multiple of 16, got {S}")


def decode_attention_pallas(q, kt, vt, start, length, scale):
    """One query position per row against a KV cache through JAX's Pallas GPU decode-attention kernel (split-k
    flash decoding): q [B, H, hd], kt / vt [B, Hkv, S, hd] (the cache's own layout, no copy), a row's valid slots
    [start, length) ([B] int32 each) -> [B, H, hd] in q's dtype. Only the splits and blocks below ``length`` are
    read, so a decode step costs each row's own context, not the cache's size. On GPU the compiled Triton kernel;
    elsewhere Pallas interpret mode (tests)."""
    from jax.experimental.pallas.ops.gpu import decode_attention as da

    B, H, hd = q.shape
    Hkv, S = kt.shape[1], kt.shape[2]
    ks, bk = _splits(S)
    inner = functools.partial(da.decode_attn_unbatched, sm_scale=float(scale), block_h=16, block_k=bk, k_splits=ks,
                              num_warps=None, num_stages=2, grid=None, interpret=jax.default_backend() != "gpu",
                              debug=False, return_residuals=False, normalize_output=True)
    per_head = lambda a: jnp.broadcast_to(a.astype(jnp.int32)[:, None], (B, Hkv))  # noqa: E731
    o = jax.vmap(jax.vmap(inner))(q.reshape(B, Hkv, H // Hkv, hd), kt, vt, per_head(start), per_head(length))
    return o.reshape(B, H, hd).astype(q.dtype)


TPU_DECODE_BLOCKS = (512, 256, 128)
_LANES = 128


def _tpu_decode_kernel(layer_ref, start_ref, len_ref, first_ref, last_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc,
                       acc_sc, *, bk, nk, rows, scale):
    """One block of ``rows`` rows, one KV head's G queries each, against one block of bk cache slots; online
    softmax over the blocks that overlap a row's valid slots [start, length) (a row skips the others; the index
    map fetches only the blocks some row of the block needs). m / l are kept lane-broadcast, [G, 128], as in JAX's
    flash attention kernel; every dot is a 2-D [G, hd] x [bk, hd] one, row by row (a static loop)."""
    from jax.experimental import pallas as pl

    del layer_ref, first_ref, last_ref  # used by the index maps only
    rb, j = pl.program_id(0), pl.program_id(2)
    hd = acc_sc.shape[-1]

    def lanes_to_hd(a):  # [G, 128] -> [G, hd]
        return a[:, :hd] if hd <= _LANES else jnp.tile(a, (1, hd // _LANES))

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    for r in range(rows):
        st, ln = start_ref[rb * rows + r], len_ref[rb * rows + r]

        @pl.when((j * bk < ln) & ((j + 1) * bk > st))
        def _block(r=r, st=st, ln=ln):
            q = q_ref[r].astype(jnp.float32) * scale  # [G, hd]
            k = k_ref[r].astype(jnp.float32)  # [bk, hd]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [G, bk]
            pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where((pos >= st) & (pos < ln), s, -0.7 * float(jnp.finfo(jnp.float32).max))
            m_prev, l_prev = m_sc[r], l_sc[r]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [G, 128]
            p = jnp.exp(s - jnp.tile(m_next, (1, bk // _LANES)))
            alpha = jnp.exp(m_prev - m_next)
            l_sc[r] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
            m_sc[r] = m_next
            pv = jax.lax.dot(p, v_ref[r].astype(jnp.float32), preferred_element_type=jnp.float32)  # [G, hd]
            acc_sc[r] = acc_sc[r] * lanes_to_hd(alpha) + pv

    @pl.when(j == nk - 1)
    def _out():
        for r in range(rows):
            lr = lanes_to_hd(l_sc[r])
            o_ref[r] = (acc_sc[r] / jnp.where(lr == 0.0, 1.0, lr)).astype(o_ref.dtype)


def decode_attention_tpu(q, k, v, layer, start, length, scale, *, rows=None, interpret=None):
    """One query position per row against a KV cache, as a Pallas TPU (Mosaic) kernel: q [B, H, hd], k / v the
    stacked cache [L, B, Hkv, S, hd] read at layer ``layer`` (an int32 scalar: inside the layer scan no layer is
    copied out), a row's valid slots [start, length) ([B] int32 each) -> [B, H, hd] in q's dtype.

    Grid (block of ``rows`` rows, KV head, block of slots); the bounds are scalar-prefetched and the K/V index maps
    clamp the slot block into the blocks the rows need, so the pipeline fetches each of those once and nothing
    else: a step reads its rows' context, not the cache. A grid step has a fixed cost on TPU, so rows come in
    blocks (default: 8 where they divide the batch): in a decode step every row's ``length`` is the same and only
    the prompt's start differs, so a block of rows wastes little. JAX's own TPU kernels (``paged_attention``,
    ``ragged_paged_attention``) take a paged cache [Hkv, pages, page, hd] with every row starting at slot 0; this
    one reads the engine's contiguous, left-padded cache in place. S must be a multiple of 128 and hd at most 128
    or a multiple of it. On TPU the compiled kernel; elsewhere Pallas interpret mode (tests). Not yet measured on
    a TPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, H, hd = q.shape
    _, _, Hkv, S, _ = k.shape
    G = H // Hkv
    bk = next((b for b in TPU_DECODE_BLOCKS if S % b == 0), None)
    if bk is None or (hd > _LANES and hd % _LANES):
        raise ValueError(f"TPU decode attention needs a cache length that is a multiple of 128 and a head dim <= 128 "
                         f"or a multiple of 128, got {S} and {hd}")
    rows = rows or next(r for r in (8, 4, 2, 1) if B % r == 0)
    if B % rows:
        raise ValueError(f"TPU decode attention: rows={rows} does not divide the batch ({B})")
    nk = S // bk
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    start, length = start.astype(jnp.int32), length.astype(jnp.int32)
    # the slot blocks each block of rows needs: from the first row start to the last row end
    first = jax.lax.div(start.reshape(B // rows, rows).min(1), bk)
    last = jax.lax.div(jnp.maximum(length - 1, start).reshape(B // rows, rows).max(1), bk)

    def kv_map(rb, h, j, layer_ref, start_ref, len_ref, first_ref, last_ref):
        return layer_ref[0], rb, h, jnp.minimum(jnp.maximum(j, first_ref[rb]), last_ref[rb]), 0

    kv_spec = pl.BlockSpec((None, rows, None, bk, hd), kv_map)
    # [B, H, 1, hd] with blocks of G heads: the layout JAX's paged attention kernel uses when G is not a multiple
    # of 8 (a [G, hd] tile per row)
    q_spec = pl.BlockSpec((rows, G, None, hd), lambda rb, h, j, *_: (rb, h, 0, 0))
    kernel = functools.partial(_tpu_decode_kernel, bk=bk, nk=nk, rows=rows, scale=float(scale))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5, grid=(B // rows, Hkv, nk), in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, G, _LANES), jnp.float32), pltpu.VMEM((rows, G, _LANES), jnp.float32),
                            pltpu.VMEM((rows, G, hd), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, H, 1, hd), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), start, length, first, last,
      q.reshape(B, H, 1, hd).astype(jnp.float32), k, v)
    return out.reshape(B, H, hd).astype(q.dtype)


DECODE_KERNELS = ("gpu", "tpu")


def decode_kernel(kernel: str | None = None) -> str:
    """Which Pallas decode-attention kernel runs: ``kernel`` if given, else the TPU one on TPU and the GPU one
    elsewhere (interpret mode off GPU)."""
    if kernel is None:
        return "tpu" if jax.default_backend() == "tpu" else "gpu"
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode attention kernel must be one of {DECODE_KERNELS}, got {kernel!r}")
    return kernel


def decode_attention(q, k, v, start, length, scale, *, layer=None, kernel: str | None = None):
    """A decode step's attention through a Pallas kernel (:func:`decode_kernel` picks it), on each device's own
    rows and KV heads under a mesh (:func:`local_shards`): q [B, H, hd]; k / v one layer's cache [B, Hkv, S, hd]
    (``layer`` None) or the stacked [L, B, Hkv, S, hd] at ``layer``; [start, length) each row's valid slots."""
    kernel = decode_kernel(kernel)
    if kernel == "gpu" and layer is not None:
        k = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
        layer = None
    rows = P(BATCH_AXES, "tensor", None)
    if kernel == "gpu":
        cache = P(BATCH_AXES, "tensor", None, None)
        return local_shards(functools.partial(decode_attention_pallas, scale=scale), (q, k, v, start, length),
                            (rows, cache, cache, P(BATCH_AXES), P(BATCH_AXES)), rows, ref=1)
    if layer is None:
        k, v, layer = k[None], v[None], 0
    cache = P(None, BATCH_AXES, "tensor", None, None)
    fn = lambda a, b, c, i, s, n: decode_attention_tpu(a, b, c, i, s, n, scale)  # noqa: E731
    return local_shards(fn, (q, k, v, jnp.asarray(layer, jnp.int32), start, length),
                        (rows, cache, cache, P(), P(BATCH_AXES), P(BATCH_AXES)), rows, ref=1)
