"""Pallas TPU (Mosaic) kernel for the probability-weighted embedding, plain and fused forms.

out[n, :] = sum_k w[n, k] * table[ids[n, k], :] with float32 accumulation; the fused form builds
w = softmax(ytil / tau) (slots 1..K-1 masked where ``discrete``) in the kernel.

Structure:
- the ids are scalar-prefetched into SMEM (``pltpu.PrefetchScalarGridSpec``), so the kernel reads them as scalars;
- the table stays in HBM (``memory_space=pl.ANY``); each grid step covers ``block_tokens`` tokens and gathers their
  K rows each with one DMA per row into a VMEM buffer laid out [slot, K, BT, D];
- the buffer is double-buffered across grid steps: step i starts the DMAs of block i+1 into the other slot before
  waiting for its own (step 0 also starts block 0), so the row fetches overlap the weighted sum and the writeback.
  The grid therefore runs in order ("arbitrary"): on two-TensorCore chips it uses one core per call;
- weights / ytil / tau / discrete arrive as ordinary pipelined VMEM blocks, the output leaves as one, and a partial
  last block (N not a multiple of the block) is masked by Pallas; its missing tokens fetch row ids[N-1] (discarded).
- SMEM is small (1 MiB on v4 and later, 16 KiB before), so N is split into calls of at most ``max_prefetch_ids``
  ids; the calls write disjoint blocks of one output buffer through ``input_output_aliases`` (no concatenation copy).

Tested on CPU under TPU interpret mode (``interpret=pltpu.InterpretParams()``, which simulates the DMAs and
semaphores, and poisons uninitialised memory with NaN); its lowering to Mosaic is checked with ``jax.export`` for
``tpu``. Not yet run on a TPU: Mosaic's own compiler (in libtpu) has not seen it, and the block sizes are untuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """block_tokens: tokens per grid step (a multiple of the sublane tiling: 8 for 32-bit, 16 for 16-bit tables).
    buffer_bytes: VMEM budget for the two row buffers, used when block_tokens is None.
    max_prefetch_ids: most ids scalar-prefetched into SMEM by one call (4 bytes each)."""

    block_tokens: int | None = None
    buffer_bytes: int = 6 * 1024 * 1024
    max_prefetch_ids: int = 1 << 16


def _block_tokens(n: int, k: int, d: int, itemsize: int, cfg: TpuConfig) -> int:
    sub = 8 * max(1, 4 // itemsize)
    if cfg.block_tokens is not None:
        bt = cfg.block_tokens
    else:
        dpad = -(-d // 128) * 128
        bt = cfg.buffer_bytes // (2 * k * dpad * itemsize)
        bt = max(sub, min(128, bt // sub * sub))
    if n <= bt:
        return n  # one block covering all of N (a block equal to the full dimension is always legal)
    return bt


block_tokens = _block_tokens  # public: the tokens per grid step a config picks (benchmarks/bench_soft_embed.py)


def _kernel(ids_smem, *refs, n: int, v: int, k_slots: int, bt: int, fused: bool, tau_rows: bool, has_disc: bool,
            aliased: bool):
    refs = list(refs)
    sem = refs.pop()
    buf = refs.pop()
    out_ref = refs.pop()
    if aliased:
        refs.pop()  # the output buffer of the previous chunk, aliased to out_ref; not read
    table_hbm = refs.pop()
    if fused:
        y_ref, tau_ref, *rest = refs
        disc_ref = rest[0] if has_disc else None
    else:
        (w_ref,) = refs

    i = pl.program_id(0)
    nb = pl.num_programs(0)
    slot = lax.rem(i, 2)

    def row_copy(row, t, kk, s):
        return pltpu.make_async_copy(table_hbm.at[pl.ds(row, 1)], buf.at[s, kk, pl.ds(t, 1)], sem.at[s])

    def fetch(block, s):
        def body(t, carry):
            tok = jnp.minimum(block * bt + t, n - 1)
            for kk in range(k_slots):
                row = jnp.clip(ids_smem[tok * k_slots + kk], 0, v - 1)
                row_copy(row, t, kk, s).start()
            return carry

        lax.fori_loop(0, bt, body, 0)

    @pl.when(i == 0)
    def _():
        fetch(0, 0)

    @pl.when(i + 1 < nb)
    def _():
        fetch(i + 1, 1 - slot)

    # the weights, while this block's rows are in flight
    if fused:
        y = y_ref[...].astype(jnp.float32)  # [BT, K]
        tau = tau_ref[...] if tau_rows else tau_ref[0]
        y = y / tau
        if has_disc:
            lane = lax.broadcasted_iota(jnp.int32, y.shape, 1)
            y = jnp.where((disc_ref[...] != 0) & (lane > 0), -jnp.inf, y)
        e = jnp.exp(y - jnp.max(y, axis=1, keepdims=True))
        w = e / jnp.sum(e, axis=1, keepdims=True)
    else:
        w = w_ref[...].astype(jnp.float32)

    def wait_body(t, carry):
        for kk in range(k_slots):
            row_copy(0, 0, kk, slot).wait()  # every row copy has the same size: one wait per copy started
        return carry

    lax.fori_loop(0, bt, wait_body, 0)

    acc = w[:, 0:1] * buf[slot, 0].astype(jnp.float32)
    for kk in range(1, k_slots):
        acc += w[:, kk:kk + 1] * buf[slot, kk].astype(jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def _call(table, ids, extra_rows, tau_scalar, *, fused, has_disc, config, interpret):
    """extra_rows: per-token [N, c] inputs (weights or ytil, then [N,1] tau rows / discrete); tau_scalar: [1]/None."""
    n, k = ids.shape
    v, d = table.shape
    cfg = config or TpuConfig()
    bt = _block_tokens(n, k, d, table.dtype.itemsize, cfg)
    chunk = max(bt, (cfg.max_prefetch_ids // k) // bt * bt)
    ids_flat = ids.reshape(-1)
    out = None
    # The last chunk (the one holding a partial block, if any) goes first and allocates the output; the others alias
    # it and write only full blocks (TPU interpret mode does not pad aliased buffers to whole blocks).
    for c0 in reversed(range(0, n, chunk)):
        nc = min(chunk, n - c0)
        off = c0 // bt
        nb = pl.cdiv(nc, bt)
        row_spec = lambda cols: pl.BlockSpec((bt, cols), lambda i, ids_ref, off=off: (i + off, 0))  # noqa: E731
        in_specs = [row_spec(x.shape[1]) for x in extra_rows[:1]]
        args = list(extra_rows[:1])
        if fused:
            if tau_scalar is not None:
                in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
                args.append(tau_scalar)
            else:
                in_specs.append(row_spec(1))
                args.append(extra_rows[1])
            if has_disc:
                in_specs.append(row_spec(1))
                args.append(extra_rows[-1])
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(table)
        aliases = {}
        if out is not None:
            in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
            args.append(out)
            aliases = {len(args): 0}  # operand index counts the scalar-prefetch operand first
        kern = functools.partial(_kernel, n=nc, v=v, k_slots=k, bt=bt, fused=fused,
                                 tau_rows=fused and tau_scalar is None, has_disc=has_disc, aliased=out is not None)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nb,),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bt, d), lambda i, ids_ref, off=off: (i + off, 0)),
            scratch_shapes=[pltpu.VMEM((2, k, bt, d), table.dtype), pltpu.SemaphoreType.DMA((2,))],
        )
        out = pl.pallas_call(
            kern,
            out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
            grid_spec=grid_spec,
            input_output_aliases=aliases,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
            interpret=interpret,
            name=f"soft_embed{'_fused' if fused else ''}_k{k}",
        )(ids_flat[c0 * k:(c0 + nc) * k], *args)
    return out


def _interpret_arg(interpret):
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def soft_embed(table: jax.Array, ids: jax.Array, weights: jax.Array, *, config: TpuConfig | None = None,
               interpret=False) -> jax.Array:
    """table [V, D], ids [N, K], weights [N, K] -> [N, D] in table.dtype. ``interpret``: False, True (default TPU
    interpret parameters) or a ``pltpu.InterpretParams``."""
    if ids.shape[0] == 0:
        return jnp.zeros((0, table.shape[1]), table.dtype)
    return _call(table, ids.astype(jnp.int32), (weights,), None, fused=False, has_disc=False, config=config,
                 interpret=_interpret_arg(interpret))


def soft_embed_fused(table: jax.Array, ids: jax.Array, ytil: jax.Array, tau: jax.Array,
                     discrete: jax.Array | None = None, *, config: TpuConfig | None = None,
                     interpret=False) -> jax.Array:
    """ids, ytil [N, K]; tau float32 of shape [1] or [N]; discrete [N] or None."""
    n = ids.shape[0]
    if n == 0:
        return jnp.zeros((0, table.shape[1]), table.dtype)
    tau = jnp.asarray(tau, jnp.float32).reshape(-1)
    if tau.shape[0] not in (1, n):
        raise ValueError(f"tau must have 1 or N={n} entries, got shape {tau.shape}")
    rows = [ytil]
    tau_scalar = tau if tau.shape[0] == 1 else None
    if tau_scalar is None:
        rows.append(tau.reshape(n, 1))
    if discrete is not None:
        rows.append(discrete.astype(jnp.int32).reshape(n, 1))
    return _call(table, ids.astype(jnp.int32), tuple(rows), tau_scalar, fused=True, has_disc=discrete is not None,
                 config=config, interpret=_interpret_arg(interpret))


__all__ = ["TpuConfig", "block_tokens", "soft_embed", "soft_embed_fused"]
