"""Token-budget micro-batches: rows grouped by length under a token budget per device, each micro-batch padded only to
its own length bucket (what verl calls dynamic batch size, ``use_dynamic_bsz``).

A mini-batch's loss is the same as over fixed-row micro-batches: the trainer adds sums and denominators exactly
(``rl.objective``), a row's real tokens are moved to the front of its micro-batch row (positions follow the
attention mask, so nothing the model computes depends on where a row's padding was), and a micro-batch that is not
full is filled with copies of its first row whose ``loss_mask`` is all False (they add nothing and stay finite).

Why buckets and not packing several rows into one sequence: packing needs attention that respects segment ids at no
cost for the cross-segment blocks. Splash attention (TPU) skips them, but the XLA path computes the whole [T, T]
score matrix and the cuDNN path here masks by sequence length only, so on CPU and GPU a packed row of T tokens costs
the attention of one T-token row. With length buckets (at most ``1 / steps`` of a bucket is padding) the padded
share of processed tokens stays near 5% on RL's long-tailed lengths (``benchmarks/bench_train_scale.py``), so
packing has little left to win.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def token_bucket(n: int, granule: int = 64, steps: int = 8) -> int:
    """The padded length for a row of ``n`` tokens: a multiple of ``granule`` up to ``steps * granule``, then
    ``steps`` lengths per doubling (``granule * m * 2**e`` with ``steps <= m < 2 * steps``): at most about
    ``1 / steps`` of a bucket is padding, and a run compiles a few shapes per doubling of length."""
    if n <= steps * granule:
        return max(granule, -(-n // granule) * granule)
    e = 0
    while granule * 2 * steps * 2 ** e < n:
        e += 1
    unit = granule * 2 ** e
    return -(-n // unit) * unit


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """Micro-batches of one shape: ``rows`` [n_micro, R] indices into the mini-batch (R divisible by the data-parallel
    device count), each micro-batch padded to ``length`` tokens; ``filler`` [n_micro, R] marks rows that only fill
    a micro-batch (copies, scored nowhere)."""

    length: int
    rows: np.ndarray
    filler: np.ndarray


def plan_micro_batches(lengths, max_tokens: int, n_devices: int = 1, *, granule: int = 64,
                       steps: int = 8, overhead_share: float = 1 / 32) -> list[MicroBatches]:
    """Group rows of real lengths ``lengths`` [B] into micro-batches of at most ``max_tokens`` padded tokens per
    device (one row per device at least, whatever its length).

    Rows are taken longest first; a micro-batch is padded to the bucket of its longest row (``token_bucket``) and
    holds ``n_devices * c`` rows, c a power of two up to ``max_tokens // bucket`` (or that maximum), dealt to the
    devices in snake order so that each device's real tokens are about equal. Where the micro-batches end is chosen
    by dynamic programming over the sorted rows to minimise the processed token slots (padding and filler rows
    included) plus, per micro-batch, ``overhead_share`` of the budget (a micro-batch has fixed costs: the weights are
    read once per pass; a larger share gives fewer, fuller micro-batches and fewer compiled shapes, a smaller one
    less padding: 1/32 kept it near 7% on RL-like lengths); powers of two keep the number of compiled shapes
    small. Micro-batches of one shape are returned
    together (the trainer scans over them)."""
    lengths = np.asarray(lengths, np.int64)
    if max_tokens <= 0 or n_devices <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) and n_devices ({n_devices}) must be positive")
    order = np.argsort(-lengths, kind="stable")
    B = len(order)
    buckets = [token_bucket(max(int(lengths[r]), 1), granule, steps) for r in order]
    overhead = max_tokens * n_devices * overhead_share
    best = np.full(B + 1, np.inf)
    choice = [None] * (B + 1)
    best[B] = 0.0
    for i in range(B - 1, -1, -1):  # best[i]: the cheapest plan for sorted rows i..B-1
        T = buckets[i]
        cap = max(1, max_tokens // T)
        sizes = sorted({c for c in (2 ** e for e in range(cap.bit_length())) if c <= cap} | {cap})
        for c in sizes:
            j = min(B, i + c * n_devices)
            cost = c * n_devices * T + overhead + best[j]
            if cost < best[i]:
                best[i], choice[i] = cost, (c, j)
    groups: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    i = 0
    while i < B:
        c, j = choice[i]
        T, R = buckets[i], c * n_devices
        take = order[i:j]
        filler = np.zeros(R, bool)
        if len(take) < R:
            filler[len(take):] = True
            take = np.concatenate([take, np.full(R - len(take), take[0])])
        slots = np.arange(R).reshape(c, n_devices)  # [round, device] -> rank among the micro-batch's rows
        slots[1::2] = slots[1::2, ::-1]
        layout = slots.T.reshape(-1)  # the batch axis is split into devices: device d holds [d * c, (d + 1) * c)
        groups.setdefault((T, R), []).append((take[layout], filler[layout]))
        i = j
    return [MicroBatches(T, np.stack([r for r, _ in g]), np.stack([f for _, f in g]))
            for (T, _), g in sorted(groups.items(), reverse=True)]


def row_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Real tokens per row of a trainer batch (its attention mask)."""
    return np.asarray(batch["attention_mask"]).astype(bool).sum(axis=1)


def gather_micro_batches(batch: dict[str, np.ndarray], mbs: MicroBatches) -> dict[str, np.ndarray]:
    """The arrays of ``mbs``: every field of ``batch`` (``[B, T, ...]`` per position or ``[B]`` per row) as
    ``[n_micro, R, length, ...]`` / ``[n_micro, R]``, each row's real tokens first (in order), filler rows with
    ``loss_mask`` all False."""
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    B, T = mask.shape
    idx = mbs.rows  # [n, R]
    if mbs.length < row_lengths(batch)[idx].max():
        raise ValueError(f"micro-batch length {mbs.length} is shorter than a row it holds")
    # per row: the positions of its real tokens first (stable), then its padding, cut to the bucket
    perm = np.argsort(~mask, axis=1, kind="stable")
    cols = perm[idx][..., :min(mbs.length, T)]  # [n, R, L]
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim >= 2 and v.shape[:2] == (B, T):
            g = np.take_along_axis(v[idx], cols.reshape(cols.shape + (1,) * (v.ndim - 2)), axis=2)
            if g.shape[2] < mbs.length:  # a bucket longer than the batch's own layout: pad at the end
                pad = [(0, 0)] * g.ndim
                pad[2] = (0, mbs.length - g.shape[2])
                g = np.pad(g, pad)
            out[k] = g
        elif v.ndim >= 1 and v.shape[0] == B:
            out[k] = v[idx]
        else:
            raise ValueError(f"batch field {k!r} of shape {v.shape} is neither per row [B] nor per position [B, T]")
    # a filler row keeps its source row's values (finite everywhere) but scores nothing
    out["loss_mask"] = np.where(mbs.filler[..., None], False, out["loss_mask"])
    # a row's real tokens now come first: those beyond its length are padding wherever the mask says so
    out["attention_mask"] = out["attention_mask"].astype(bool) & (
        np.arange(mbs.length)[None, None, :] < row_lengths(batch)[idx][..., None])
    return out


def padding_fraction(plans: list[MicroBatches], lengths) -> float:
    """The share of processed token slots (micro-batches x rows x length) that hold no real token."""
    lengths = np.asarray(lengths)
    processed = sum(p.rows.size * p.length for p in plans)
    real = sum(int(lengths[p.rows][~p.filler].sum()) for p in plans)
    return 1.0 - real / max(processed, 1)
