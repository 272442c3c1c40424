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

Shared prompts (``plan_prefix_micro_batches`` / ``gather_prefix_micro_batches``): the rows of a group repeat one
prompt. A micro-batch can hold its responses only and each distinct prompt once; the model runs the prompts first
and lets each response attend over its prompt's keys and values (``models.transformer.forward``'s ``prefix``), with
the gradient of every row flowing back into the prompt's pass. The loss is the same; the prompt's tokens are
computed once per micro-batch instead of once per row (the rollout's group of 8 rows: 8x fewer prompt tokens).
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
    a micro-batch (copies, scored nowhere). Shared prompts (``plan_prefix_micro_batches``): ``length`` is the
    responses', ``prompts`` [n_micro, U] a row holding each distinct prompt (U divisible by the device count;
    repeats fill), ``prefix`` [n_micro, R] which of them each row continues, ``prompt_length`` their padded
    length."""

    length: int
    rows: np.ndarray
    filler: np.ndarray
    prompt_length: int = 0
    prompts: np.ndarray | None = None
    prefix: np.ndarray | None = None


def plan_micro_batches(lengths, max_tokens: int, n_devices: int = 1, *, granule: int = 64,
                       steps: int = 8, overhead_share: float = 1 / 32, known=(),
                       new_shape_cost: float = 0.0) -> list[MicroBatches]:
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
    together.

    Every shape is a compiled program (one for the update, one for the log-prob passes), and a run meets new lengths
    at every step. ``known``: the shapes ``(length, rows)`` compiled already; a micro-batch may take one of them
    whenever it holds its rows within the budget (padding to a longer known length), and, once ``known`` holds
    anything, a shape not in it costs ``new_shape_cost`` of a micro-batch's budget more. A small cost settles a run
    on a few dozen shapes at little extra padding (``benchmarks/count_train_shapes.py``); 0: padding alone decides."""
    lengths = np.asarray(lengths, np.int64)
    if max_tokens <= 0 or n_devices <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) and n_devices ({n_devices}) must be positive")
    if new_shape_cost < 0:
        raise ValueError(f"new_shape_cost must be >= 0, got {new_shape_cost}")
    order = np.argsort(-lengths, kind="stable")
    B = len(order)
    buckets = [token_bucket(max(int(lengths[r]), 1), granule, steps) for r in order]
    overhead = max_tokens * n_devices * overhead_share
    known = {(int(T), int(R)) for T, R in known}
    # known shapes this plan may use: rows dealt evenly to the devices, within the budget (one row per device always)
    usable = sorted((T, R) for T, R in known if R % n_devices == 0 and (R == n_devices or R // n_devices * T
                                                                          <= max_tokens))
    penalty = new_shape_cost * max_tokens * n_devices if known else 0.0
    best = np.full(B + 1, np.inf)
    choice = [None] * (B + 1)
    best[B] = 0.0
    for i in range(B - 1, -1, -1):  # best[i]: the cheapest plan for sorted rows i..B-1
        T = buckets[i]
        cap = max(1, max_tokens // T)
        sizes = sorted({c for c in (2 ** e for e in range(cap.bit_length())) if c <= cap} | {cap})
        for L, R in [(T, c * n_devices) for c in sizes] + [s for s in usable if s[0] >= T]:
            j = min(B, i + R)
            cost = R * L + overhead + best[j] + (0.0 if (L, R) in known else penalty)
            if cost < best[i]:
                best[i], choice[i] = cost, (L, R, j)
    groups: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    i = 0
    while i < B:
        T, R, j = choice[i]
        c = R // n_devices
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
    out = _gather_fields(batch, idx, mbs.length,
                         lambda v: np.take_along_axis(v, cols.reshape(cols.shape + (1,) * (v.ndim - 3)), axis=2))
    # a filler row keeps its source row's values (finite everywhere) but scores nothing
    out["loss_mask"] = np.where(mbs.filler[..., None], False, out["loss_mask"])
    # a row's real tokens now come first: those beyond its length are padding wherever the mask says so
    out["attention_mask"] = out["attention_mask"].astype(bool) & (
        np.arange(mbs.length)[None, None, :] < row_lengths(batch)[idx][..., None])
    return out


def _gather_fields(batch: dict[str, np.ndarray], idx: np.ndarray, length: int, cut) -> dict[str, np.ndarray]:
    """Every field of ``batch`` for the rows ``idx`` [n, R]: per-position fields ``[B, T, ...]`` through ``cut``
    (``[n, R, T, ...]`` -> ``[n, R, <= length, ...]``) and padded at the end to ``length``, per-row ones ``[n, R]``."""
    B, T = np.asarray(batch["attention_mask"]).shape
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim >= 2 and v.shape[:2] == (B, T):
            g = cut(v[idx])
            if g.shape[2] < length:  # a bucket longer than the batch's own layout: pad at the end
                pad = [(0, 0)] * g.ndim
                pad[2] = (0, length - g.shape[2])
                g = np.pad(g, pad)
            out[k] = g
        elif v.ndim >= 1 and v.shape[0] == B:
            out[k] = v[idx]
        else:
            raise ValueError(f"batch field {k!r} of shape {v.shape} is neither per row [B] nor per position [B, T]")
    return out


def padding_fraction(plans: list[MicroBatches], lengths) -> float:
    """The share of processed token slots (micro-batches x rows x length) that hold no real token."""
    lengths = np.asarray(lengths)
    processed = sum(p.rows.size * p.length for p in plans)
    real = sum(int(lengths[p.rows][~p.filler].sum()) for p in plans)
    return 1.0 - real / max(processed, 1)


# ------------------------------------------------------------------------------------------------ shared prompts
def prompt_ids(batch: dict[str, np.ndarray], prompt_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a trainer batch whose first ``prompt_width`` columns hold the (left-padded) prompt: which distinct
    prompt it has (ids 0..), its prompt's real tokens and its response's real tokens, each [B]."""
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    tok = np.asarray(batch["tokens"])
    if not 0 < prompt_width < mask.shape[1]:
        raise ValueError(f"prompt_width {prompt_width} must lie inside the rows' {mask.shape[1]} columns")
    pm = mask[:, :prompt_width]
    key = np.concatenate([np.where(pm, tok[:, :prompt_width], -1), pm], axis=1)
    _, pid = np.unique(key, axis=0, return_inverse=True)
    return pid.reshape(-1), pm.sum(1), mask[:, prompt_width:].sum(1)


def plan_prefix_micro_batches(prompt_id, prompt_lengths, lengths, max_tokens: int, n_devices: int = 1, *,
                              granule: int = 64, steps: int = 8, overhead_share: float = 1 / 32
                              ) -> list[MicroBatches]:
    """``plan_micro_batches`` for shared prompts: rows with response lengths ``lengths`` [B] and prompts
    ``prompt_id`` / ``prompt_lengths`` [B]. A micro-batch of R rows with U distinct prompts processes
    ``R * bucket(longest response) + U * bucket(longest prompt)`` token slots, at most ``max_tokens`` per device
    (one row per device at least). Two row orders are planned, and the cheaper plan kept: prompt by prompt (the
    prompts with the longest responses first), where the prompts dominate the cost, and by response bucket
    (longest first; within a bucket by prompt), where the responses do; the ends of the micro-batches along an order
    are chosen by the same dynamic programming as ``plan_micro_batches``. On several devices each device takes a
    run of the order and computes the prompts of its own rows (``prompts`` device by device, ``prefix`` into the
    device's own); the rows are not dealt for balance as ``plan_micro_batches`` deals them."""
    lengths = np.asarray(lengths, np.int64)
    pid = np.asarray(prompt_id, np.int64)
    plen = np.asarray(prompt_lengths, np.int64)
    if max_tokens <= 0 or n_devices <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) and n_devices ({n_devices}) must be positive")
    B = len(lengths)
    rb = np.asarray([token_bucket(max(int(n), 1), granule, steps) for n in lengths])
    pb = np.asarray([token_bucket(max(int(n), 1), granule, steps) for n in plen])
    group_rb = np.zeros(int(pid.max()) + 1 if B else 0, np.int64)
    np.maximum.at(group_rb, pid, rb)
    # prompt by prompt first: at equal cost the plan that shares more prompts
    orders = (np.lexsort((-lengths, pid, -group_rb[pid])), np.lexsort((-lengths, pid, -rb)))
    overhead = max_tokens * n_devices * overhead_share
    plans = []
    for order in orders:
        best = np.full(B + 1, np.inf)
        choice: list = [None] * (B + 1)
        best[B] = 0.0
        sp = pid[order]
        new = np.concatenate([[True], sp[1:] != sp[:-1]])  # a row whose prompt differs from the previous row's
        for i in range(B - 1, -1, -1):
            tmax = pmax = 0
            j, c = i, 1
            while True:
                end = min(B, i + c * n_devices)
                while j < end:
                    tmax, pmax = max(tmax, int(rb[order[j]])), max(pmax, int(pb[order[j]]))
                    j += 1
                # distinct prompts of the busiest device (the order keeps a prompt's rows together)
                u = max(1 + int(new[a + 1:min(a + c, end)].sum()) for a in range(i, end, c))
                u = min(1 << (u - 1).bit_length(), c)  # as the micro-batches are laid out
                slots = c * n_devices * tmax + u * n_devices * pmax
                if c > 1 and slots > max_tokens * n_devices:
                    break
                if slots + overhead + best[end] < best[i]:
                    best[i], choice[i] = slots + overhead + best[end], c
                if end >= B:
                    break
                c *= 2
        plans.append((best[0], order, choice))
    _, order, choice = min(plans, key=lambda p: p[0])
    groups: dict[tuple, list] = {}
    i = 0
    while i < B:
        c = choice[i]
        R = c * n_devices
        take = order[i:min(B, i + R)]
        filler = np.zeros(R, bool)
        if len(take) < R:
            filler[len(take):] = True
            take = np.concatenate([take, np.full(R - len(take), take[0])])
        # device d takes rows [d * c, (d + 1) * c) of the order (a prompt's rows together) and computes the
        # prompts they continue: per device, its distinct prompts
        per_dev = [np.unique(pid[take[d * c:(d + 1) * c]], return_index=True) for d in range(n_devices)]
        reps = [take[d * c + first] for d, (_, first) in enumerate(per_dev)]
        local = [np.searchsorted(u, pid[take[d * c:(d + 1) * c]]) for d, (u, _) in enumerate(per_dev)]
        key = (int(rb[take].max()), R, int(pb[take].max()))
        groups.setdefault(key, []).append((take, filler, reps, local))
        i += R
    out = []
    for (T, R, Pb), g in sorted(groups.items(), reverse=True):
        u = max(len(r) for x in g for r in x[2])  # prompts per device, to a power of two (fewer compiled shapes)
        u = min(1 << (u - 1).bit_length(), R // n_devices)
        reps = np.stack([np.concatenate([np.concatenate([r, np.full(u - len(r), r[0])]) for r in x[2]]) for x in g])
        prefix = np.stack([np.concatenate([d * u + ix for d, ix in enumerate(x[3])]) for x in g])
        out.append(MicroBatches(T, np.stack([x[0] for x in g]), np.stack([x[1] for x in g]), Pb, reps, prefix))
    return out


SHARE_AT = 2 / 3


def plan_token_budget(batch: dict[str, np.ndarray], max_tokens: int, n_devices: int = 1, *, granule: int = 64,
                      prompt_width: int | None = None, overhead_share: float = 1 / 32, known=(),
                      new_shape_cost: float = 0.0) -> list[MicroBatches]:
    """The micro-batches of a trainer batch: ``plan_micro_batches`` over its rows, or, with ``prompt_width`` (its
    prompt columns), ``plan_prefix_micro_batches`` where that processes at most ``SHARE_AT`` of the token slots
    (each micro-batch counting ``overhead_share`` of the budget, as the plans do): shared prompts win where prompts
    weigh against the responses, rows where the responses' lengths matter more than their prompts. (The margin:
    a shared micro-batch costs more per slot on XLA:CPU, two passes and no fused attention; a SmolLM2 update over
    4 prompts x 8 rows with 1.33x fewer slots ran 1.02x faster, with 2.9x fewer 2.26x faster.) ``known`` and
    ``new_shape_cost``: ``plan_micro_batches``' (the rows' plan only)."""
    rows = plan_micro_batches(row_lengths(batch), max_tokens, n_devices, granule=granule,
                              overhead_share=overhead_share, known=known, new_shape_cost=new_shape_cost)
    if not prompt_width:
        return rows
    pid, plen, rlen = prompt_ids(batch, prompt_width)
    shared = plan_prefix_micro_batches(pid, plen, rlen, max_tokens, n_devices, granule=granule,
                                       overhead_share=overhead_share)
    overhead = max_tokens * n_devices * overhead_share

    def cost(plans):
        return sum(p.rows.size * p.length + (0 if p.prompts is None else p.prompts.size * p.prompt_length)
                   + len(p.rows) * overhead for p in plans)
    return shared if cost(shared) <= SHARE_AT * cost(rows) else rows


def gather_prefix_micro_batches(batch: dict[str, np.ndarray], mbs: MicroBatches, prompt_width: int
                                ) -> dict[str, np.ndarray]:
    """The arrays of shared-prompt micro-batches ``mbs`` from a trainer batch whose first ``prompt_width`` columns
    hold the left-padded prompts and the rest the responses (real tokens first): every per-position field as the
    responses ``[n_micro, R, length, ...]``, per-row fields ``[n_micro, R]``, and ``prompt_tokens`` /
    ``prompt_mask`` ``[n_micro, U, prompt_length]`` (real tokens first) with ``prefix_idx`` ``[n_micro, R]``
    (``rl.logprobs.token_logprobs``'s shared-prompt layout)."""
    if mbs.prompts is None:
        raise ValueError("these micro-batches have no shared prompts: plan them with plan_prefix_micro_batches")
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    B, T = mask.shape
    idx = mbs.rows
    L = mbs.length
    out = _gather_fields(batch, idx, L, lambda v: v[:, :, prompt_width:prompt_width + L])
    if mask[idx][:, :, prompt_width + L:].any():
        raise ValueError(f"micro-batch length {L} is shorter than a response it holds")
    out["loss_mask"] = np.where(mbs.filler[..., None], False, out["loss_mask"])
    pm = mask[:, :prompt_width]
    perm = np.argsort(~pm, axis=1, kind="stable")[:, :mbs.prompt_length]  # real tokens first
    ptok = np.take_along_axis(np.asarray(batch["tokens"])[:, :prompt_width], perm, axis=1)
    pmask = np.take_along_axis(pm, perm, axis=1)
    if pm[mbs.prompts].sum(-1).max() > mbs.prompt_length:
        raise ValueError(f"prompt length {mbs.prompt_length} is shorter than a prompt it holds")
    if ptok.shape[1] < mbs.prompt_length:
        ptok = np.pad(ptok, ((0, 0), (0, mbs.prompt_length - ptok.shape[1])))
        pmask = np.pad(pmask, ((0, 0), (0, mbs.prompt_length - pmask.shape[1])))
    out["prompt_tokens"] = ptok[mbs.prompts].astype(np.int32)
    out["prompt_mask"] = pmask[mbs.prompts]
    out["prefix_idx"] = mbs.prefix.astype(np.int32)
    return out


def prefix_slots(plans: list[MicroBatches], prompt_lengths, lengths) -> tuple[int, int]:
    """(processed token slots, real tokens among them) of shared-prompt micro-batches: each micro-batch's prompts
    and responses, filler rows and repeated prompts counting as padding."""
    prompt_lengths, lengths = np.asarray(prompt_lengths), np.asarray(lengths)
    processed = sum(p.rows.size * p.length + p.prompts.size * p.prompt_length for p in plans)
    real = 0
    for p in plans:
        real += int(lengths[p.rows][~p.filler].sum())
        for reps in p.prompts:
            real += int(prompt_lengths[np.unique(reps)].sum())
    return processed, real
