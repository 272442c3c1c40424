"""Pallas GPU kernel for the probability-weighted embedding (Triton lowering), plain and fused forms.

out[n, :] = sum_k w[n, k] * table[ids[n, k], :], one pass, float32 accumulation, no [N, K, D] intermediate.
The fused form computes w = softmax(ytil / tau) over the K slots in the kernel (slots 1..K-1 masked where
``discrete``), from the rollout's stored ids and perturbed log-probs.

Why the Triton lowering and not Mosaic GPU (JAX 0.11 deprecates Pallas Triton, with a warning, but ships it):

- The operation is a row gather: each output tile needs K rows picked by a vector of ids. Triton expresses that as a
  load from a tensor of pointers (``table[ids[:, None], cols[None, :]]``), which the Hopper load units serve as
  coalesced 16-byte sectors per row, with all K loads of a tile in flight at once. Hopper's TMA has no gather mode
  (tile gather arrives with Blackwell), so a Mosaic GPU kernel would issue one TMA copy per 1-7 KiB row through shared
  memory plus barriers, or fall back to per-thread loads that Mosaic GPU's warpgroup model does not make simpler.
- A first Triton kernel of this shape at 80-95% of an H200's copy bandwidth on the project's GPU
  machines (jax 0.11.2): the lowering is known to run there. Its one failure (``Unimplemented primitive ...
  slice``) came from slicing a loaded vector; this kernel never slices values, it loads each slot's ids from the ref.
  Measured since on an H200 with jax 0.11.2 (benchmarks/RESULTS.md): 1.15x XLA at the training size (118% of the
  copy-bandwidth floor), 1.02x (plain) and 2.26x (fused) at the decode size.
- It runs under Pallas' generic interpreter (``interpret=True``) on CPU, so the tests here execute the kernel body,
  and its lowering to Triton IR runs on CPU too (``jax.export`` for ``cuda``), which the tests also check.
- Migration: the default GPU backend of ``pallas_call`` is Mosaic GPU in both 0.10 and 0.11, so the Triton backend is
  selected explicitly with ``pltriton.CompilerParams``; the 0.11 deprecation warning is silenced here. When Pallas
  drops Triton, port this kernel to ``jax_triton`` (same body) or to Mosaic GPU.

Grid: one program per (block of ``block_tokens`` tokens, block of ``block_cols`` columns), column blocks adjacent by
default. Each program loads its tokens' K ids and weights (K vector loads; cached across the column programs), then
K gathered [BT, BD] tiles, and writes one [BT, BD] tile. Rows past N and columns past D are masked, so N and D need
no padding.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# JAX 0.11 warns "The Pallas Triton backend is deprecated" when it lowers a Triton kernel, which happens when the
# enclosing jit compiles, outside any call-site filter: silence that one message (see the module docstring).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

# The name of the custom call Pallas Triton emits (exported as pltriton.CUSTOM_CALL_TARGET_NAME from JAX 0.11).
CUSTOM_CALL_TARGET = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tile and launch parameters. block_tokens and block_cols must be powers of two (a Triton requirement).

    cols_fastest: the column blocks of one token block are neighbouring programs (launched together), so a table row
    is read in one burst by several SMs and the ids / weights / softmax of a block are fetched from DRAM once.
    """

    block_tokens: int = 8
    block_cols: int = 512
    num_warps: int = 4
    num_stages: int = 1
    cols_fastest: bool = True

    def __post_init__(self):
        for name in ("block_tokens", "block_cols"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GpuConfig.{name} must be a power of two, got {v}")


def _pow2_divisor(d: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and d % (b * 2) == 0:
        b *= 2
    return b


def default_config(n: int, d: int, k: int) -> GpuConfig:
    """A tile choice for N tokens of width D (see benchmarks/bench_soft_embed.py for the sweep that checks it).

    Columns: the largest power of two up to 512 dividing D (no masking; D=1536 -> 512, 3584 -> 512, 576 -> 64), or a
    masked 256-wide block when D has no power-of-two divisor of at least 64. Tokens: 8 per program, fewer when that
    would leave fewer than about 1024 programs (decode-sized N) so that every SM still gets several. For large N
    with wide column blocks, one token per program, 2 warps, token blocks adjacent: the fastest of the sweep on an
    H200 at the training size (N 65536, D 1536, K 5: 246 us vs 274 us for 8 tokens / 4 warps / columns adjacent,
    XLA 284 us; benchmarks/RESULTS.md).
    """
    del k
    bd = _pow2_divisor(d, 512)
    if bd < 64:
        bd = min(256, pl.next_power_of_2(d))
    bt = 8
    while bt > 1 and pl.cdiv(n, bt) * pl.cdiv(d, bd) < 1024:
        bt //= 2
    if bt == 8 and bd >= 256:
        return GpuConfig(block_tokens=1, block_cols=bd, num_warps=2, cols_fastest=False)
    return GpuConfig(block_tokens=bt, block_cols=bd, num_warps=4 if bt * bd >= 2048 else 2)


def _kernel(*refs, n: int, v: int, d: int, k_slots: int, bt: int, bd: int, fused: bool, tau_rows: bool,
            has_disc: bool, cols_fastest: bool):
    if fused:
        if has_disc:
            ids_ref, y_ref, tau_ref, disc_ref, table_ref, out_ref = refs
        else:
            ids_ref, y_ref, tau_ref, table_ref, out_ref = refs
    else:
        ids_ref, w_ref, table_ref, out_ref = refs
    # i: token block, j: column block. Grid axis 0 is the fastest-varying (CUDA x); Pallas folds axes past
    # CUDA's y/z limit (65535) into x, keeping the order.
    i, j = (pl.program_id(1), pl.program_id(0)) if cols_fastest else (pl.program_id(0), pl.program_id(1))
    rows = i * bt + jnp.arange(bt, dtype=jnp.int32)
    rmask = rows < n
    cols = j * bd + jnp.arange(bd, dtype=jnp.int32)
    cmask = None if d % bd == 0 else cols < d

    # ids clamped into the table: an out-of-range id must not read outside it (XLA's gather clamps too).
    ids = [jnp.clip(pltriton.load(ids_ref.at[rows, kk], mask=rmask, other=0), 0, v - 1) for kk in range(k_slots)]
    if fused:
        ys = [pltriton.load(y_ref.at[rows, kk], mask=rmask, other=0.0).astype(jnp.float32) for kk in range(k_slots)]
        if tau_rows:
            tau = pltriton.load(tau_ref.at[rows], mask=rmask, other=1.0)
        else:
            tau = tau_ref[0]
        ys = [y / tau for y in ys]  # the same op as soft_weights (divide, not multiply by 1/tau)
        if has_disc:
            disc = pltriton.load(disc_ref.at[rows], mask=rmask, other=0) != 0
            ys = ys[:1] + [jnp.where(disc, -jnp.inf, y) for y in ys[1:]]
        m = functools.reduce(jnp.maximum, ys)
        es = [jnp.exp(y - m) for y in ys]
        s = functools.reduce(jnp.add, es)
        ws = [e / s for e in es]
    else:
        ws = [pltriton.load(w_ref.at[rows, kk], mask=rmask, other=0.0).astype(jnp.float32) for kk in range(k_slots)]

    acc = jnp.zeros((bt, bd), jnp.float32)
    for kk in range(k_slots):
        idx = table_ref.at[ids[kk][:, None], cols[None, :]]
        if cmask is None:
            r = pltriton.load(idx)
        else:
            r = pltriton.load(idx, mask=jnp.broadcast_to(cmask[None, :], (bt, bd)), other=0)
        acc += ws[kk][:, None] * r.astype(jnp.float32)
    omask = rmask[:, None] if cmask is None else rmask[:, None] & cmask[None, :]
    pltriton.store(out_ref.at[pl.ds(i * bt, bt), pl.ds(j * bd, bd)], acc.astype(out_ref.dtype),
                   mask=jnp.broadcast_to(omask, (bt, bd)), eviction_policy="evict_first")


def _call(table, ids, extra, *, fused, tau_rows, has_disc, config, interpret):
    n, k = ids.shape
    v, d = table.shape
    cfg = config or default_config(n, d, k)
    bt, bd = cfg.block_tokens, cfg.block_cols
    kern = functools.partial(_kernel, n=n, v=v, d=d, k_slots=k, bt=bt, bd=bd, fused=fused, tau_rows=tau_rows,
                             has_disc=has_disc, cols_fastest=cfg.cols_fastest)
    args = (ids, *extra, table)
    grid = (pl.cdiv(n, bt), pl.cdiv(d, bd))
    call = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        grid=grid[::-1] if cfg.cols_fastest else grid,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(args),
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"soft_embed{'_fused' if fused else ''}_k{k}",
    )
    return call(*args)


def soft_embed(table: jax.Array, ids: jax.Array, weights: jax.Array, *, config: GpuConfig | None = None,
               interpret: bool = False) -> jax.Array:
    """table [V, D], ids [N, K] int32, weights [N, K] -> [N, D] in table.dtype."""
    if ids.shape[0] == 0:
        return jnp.zeros((0, table.shape[1]), table.dtype)
    return _call(table, ids.astype(jnp.int32), (weights,), fused=False, tau_rows=False, has_disc=False,
                 config=config, interpret=interpret)


def soft_embed_fused(table: jax.Array, ids: jax.Array, ytil: jax.Array, tau: jax.Array,
                     discrete: jax.Array | None = None, *, config: GpuConfig | None = None,
                     interpret: bool = False) -> jax.Array:
    """ids, ytil [N, K]; tau float32 of shape [1] (one for all) or [N]; discrete [N] (bool/int) or None."""
    n = ids.shape[0]
    if n == 0:
        return jnp.zeros((0, table.shape[1]), table.dtype)
    tau = jnp.asarray(tau, jnp.float32).reshape(-1)
    if tau.shape[0] not in (1, n):
        raise ValueError(f"tau must have 1 or N={n} entries, got shape {tau.shape}")
    extra = (ytil, tau) if discrete is None else (ytil, tau, discrete.astype(jnp.int32))
    return _call(table, ids.astype(jnp.int32), extra, fused=True, tau_rows=tau.shape[0] == n and n > 1,
                 has_disc=discrete is not None, config=config, interpret=interpret)


def floor_bytes(n: int, k: int, d: int, itemsize: int) -> int:
    """The minimum traffic: K rows read per token plus the output written (ids and weights not counted)."""
    return n * (k + 1) * d * itemsize


__all__ = ["GpuConfig", "default_config", "soft_embed", "soft_embed_fused", "floor_bytes", "CUSTOM_CALL_TARGET"]
