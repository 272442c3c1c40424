"""Token-budget micro-batches (softgrpo_jax.rl.batching): buckets, the plan's invariants on RL-like length
distributions, and the gathered arrays against the rows they came from."""

import numpy as np
import pytest

from softgrpo_jax.rl.batching import gather_micro_batches, padding_fraction, plan_micro_batches, token_bucket


def _lengths(B, cap, prompt, seed=0):
    """Prompt + response lengths, responses lognormal with median 3/8 of the budget, sigma 0.6, capped."""
    rng = np.random.RandomState(seed)
    resp = np.minimum(np.exp(rng.normal(np.log(cap * 3 / 8), 0.6, B)).astype(int), cap)
    return resp + rng.randint(prompt // 2, prompt + 1, B)


def test_token_bucket():
    for steps in (4, 8):
        prev = 0
        for n in range(1, 20000, 7):
            b = token_bucket(n, 64, steps)
            assert b >= n and b % 64 == 0 and b >= prev
            assert n <= steps * 64 or b <= n * (1 + 1 / steps) + 64, (n, b)
            prev = b
    assert token_bucket(1) == 64 and token_bucket(513) == 576 and token_bucket(8192) == 8192


@pytest.mark.parametrize("n_dev,B,budget,cap,prompt", [(1, 32, 2048, 1024, 60), (8, 512, 4096, 1024, 100),
                                                        (8, 512, 32768, 8192, 500), (4, 64, 1000, 1024, 60)])
def test_plan_invariants(n_dev, B, budget, cap, prompt):
    L = _lengths(B, cap, prompt)
    plans = plan_micro_batches(L, budget, n_dev)
    seen = np.concatenate([p.rows[~p.filler] for p in plans])
    np.testing.assert_array_equal(np.sort(seen), np.arange(B))  # every row exactly once
    shapes = set()
    for p in plans:
        n, R = p.rows.shape
        assert R % n_dev == 0 and (p.length, R) not in shapes
        shapes.add((p.length, R))
        per_dev = R // n_dev
        assert per_dev * p.length <= max(budget, p.length)  # the budget per device (one row at least)
        assert L[p.rows].max() <= p.length
        for rows, fill in zip(p.rows, p.filler):
            assert not fill[0::per_dev].all()  # a micro-batch is never all filler
            real = np.where(fill, 0, L[rows]).reshape(n_dev, per_dev).sum(1)
            if per_dev > 1 and not fill.any():  # snake order: each device's real tokens about equal
                assert real.max() <= 1.25 * real.min(), real
    assert padding_fraction(plans, L) < 0.15
    # against fixed-row micro-batches padded to the longest row's bucket: far less padding
    fixed = 1 - L.sum() / (B * token_bucket(int(L.max())))
    assert padding_fraction(plans, L) < fixed / 2


def test_gather_moves_real_tokens_first_and_fillers_score_nothing():
    rng = np.random.RandomState(1)
    B, T, K = 7, 24, 3
    mask = np.zeros((B, T), bool)
    for b in range(B):  # left-padded prompt, right-padded response: [pad, prompt, response, pad]
        s, e = rng.randint(0, 6), rng.randint(10, T + 1)
        mask[b, s:e] = True
    batch = dict(tokens=np.where(mask, rng.randint(1, 50, (B, T)), 0), attention_mask=mask,
                 topk_ids=rng.randint(0, 50, (B, T, K)), topk_ytil=rng.randn(B, T, K).astype(np.float32),
                 soft_mask=rng.rand(B, T) < 0.5, loss_mask=mask & (np.arange(T) >= 8),
                 advantages=rng.randn(B).astype(np.float32), tau=np.full(B, 0.5, np.float32))
    L = mask.sum(1)
    plans = plan_micro_batches(L, 40, 2, granule=8)
    assert any(p.filler.any() for p in plans)
    for p in plans:
        g = gather_micro_batches(batch, p)
        for i in range(p.rows.shape[0]):
            for j, (r, fill) in enumerate(zip(p.rows[i], p.filler[i])):
                n = L[r]
                assert g["attention_mask"][i, j, :n].all() and not g["attention_mask"][i, j, n:].any()
                for k in ("tokens", "topk_ids", "topk_ytil", "soft_mask"):
                    np.testing.assert_array_equal(g[k][i, j, :n], batch[k][r][mask[r]])
                np.testing.assert_array_equal(g["loss_mask"][i, j, :n], False if fill else batch["loss_mask"][r][mask[r]])
                assert not g["loss_mask"][i, j, n:].any()
                assert g["advantages"][i, j] == batch["advantages"][r]
    with pytest.raises(ValueError, match="neither per row"):
        gather_micro_batches(dict(batch, bad=np.zeros((3, 3))), plans[0])


@pytest.mark.parametrize("n_dev,groups,n,budget,prompt,cap", [(1, 4, 8, 4096, 100, 96), (1, 4, 8, 8192, 512, 96),
                                                              (1, 64, 8, 16384, 300, 8192), (4, 8, 8, 1024, 100, 256)])
def test_shared_prompt_plan_and_gather(n_dev, groups, n, budget, prompt, cap):
    """Shared-prompt micro-batches: every row once, each row continuing a prompt identical to its own, the budget
    kept, the gathered responses and prompts equal to the rows' own tokens, and fewer processed token slots than
    with each prompt inside its rows (the demo's shape: 8x fewer prompt slots)."""
    from softgrpo_jax.rl.batching import (gather_prefix_micro_batches, plan_prefix_micro_batches, plan_token_budget,
                                          prefix_slots, prompt_ids)

    rng = np.random.RandomState(3)
    B, W = groups * n, prompt
    plen = np.repeat(rng.randint(prompt // 2, prompt + 1, groups), n)
    rlen = np.minimum(np.exp(rng.normal(np.log(cap * 3 / 8), 0.6, B)).astype(int) + 1, cap)
    T = W + int(rlen.max())
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    prompts = rng.randint(1, 1000, (groups, W))
    for b in range(B):
        tokens[b, W - plen[b]:W] = prompts[b // n, W - plen[b]:]  # left-padded prompt
        mask[b, W - plen[b]:W + rlen[b]] = True
        tokens[b, W:W + rlen[b]] = rng.randint(1, 1000, rlen[b])
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": mask & (np.arange(T) >= W),
             "advantages": rng.randn(B).astype(np.float32)}
    pid, pl, rl = prompt_ids(batch, W)
    np.testing.assert_array_equal(pid, np.repeat(np.unique(pid[::n], return_inverse=True)[1], n))
    np.testing.assert_array_equal(pl, plen)
    np.testing.assert_array_equal(rl, rlen)
    plans = plan_prefix_micro_batches(pid, pl, rl, budget, n_dev)
    seen = np.concatenate([p.rows[~p.filler] for p in plans])
    np.testing.assert_array_equal(np.sort(seen), np.arange(B))
    for p in plans:
        R, U = p.rows.shape[1], p.prompts.shape[1]
        assert R % n_dev == 0 and U % n_dev == 0
        assert R == n_dev or (R * p.length + U * p.prompt_length) <= budget * n_dev
        np.testing.assert_array_equal(pid[p.prompts[np.arange(len(p.rows))[:, None], p.prefix]], pid[p.rows])
        g = gather_prefix_micro_batches(batch, p, W)
        for m in range(len(p.rows)):
            for j, b in enumerate(p.rows[m]):
                np.testing.assert_array_equal(g["tokens"][m, j, :rlen[b]], tokens[b, W:W + rlen[b]])
                assert not g["attention_mask"][m, j, rlen[b]:].any()
                u = p.prefix[m, j]
                np.testing.assert_array_equal(g["prompt_tokens"][m, u, :plen[b]], tokens[b, W - plen[b]:W])
                assert g["prompt_mask"][m, u].sum() == plen[b]
                assert g["loss_mask"][m, j].any() != p.filler[m, j]
                assert g["advantages"][m, j] == batch["advantages"][b]
    processed, real = prefix_slots(plans, pl, rl)
    assert processed >= real >= rl.sum() + pl[np.unique(pid, return_index=True)[1]].sum()
    rows_only = sum(p.rows.size * p.length for p in plan_micro_batches(pl + rl, budget, n_dev))
    chosen = plan_token_budget(batch, budget, n_dev, prompt_width=W)
    if n_dev == 1 and prompt * 4 > cap:  # prompts weigh: sharing them saves
        assert processed < 0.85 * rows_only, (processed, rows_only)
    if processed <= 0.5 * rows_only:  # chosen where it saves enough (long prompts: 2.9x fewer slots here)
        assert prompt == 512 and all(p.prompts is not None for p in chosen)
    if processed >= 0.8 * rows_only:
        assert all(p.prompts is None for p in chosen)


@pytest.mark.parametrize("n_dev,B,budget,cap,prompt", [(1, 32, 4096, 1024, 128), (8, 256, 16384, 8192, 1024)])
def test_plan_reuses_compiled_shapes(n_dev, B, budget, cap, prompt):
    """With the shapes of earlier plans known and a cost on new ones, later plans reuse them (padding to a longer
    known length where that holds the rows within the budget): far fewer shapes over many batches, every row still
    once and within the budget, a little more padding. Without known shapes the cost changes nothing."""
    def run(cost, steps=12):
        known, processed, real, new = set(), 0, 0, []
        for s in range(steps):
            L = _lengths(B, cap, prompt, seed=100 + s)
            plans = plan_micro_batches(L, budget, n_dev, known=known, new_shape_cost=cost)
            seen = np.concatenate([p.rows[~p.filler] for p in plans])
            np.testing.assert_array_equal(np.sort(seen), np.arange(B))
            for p in plans:
                R = p.rows.shape[1]
                assert R % n_dev == 0 and L[p.rows].max() <= p.length
                assert R // n_dev * p.length <= max(budget, p.length)
                assert not p.filler.all(axis=1).any()
            processed += sum(p.rows.size * p.length for p in plans)
            real += int(L.sum())
            shapes = {(p.length, p.rows.shape[1]) for p in plans}
            new.append(len(shapes - known))
            known |= shapes
        return len(known), 1 - real / processed, new

    free, pad_free, _ = run(0.0)
    kept, pad_kept, new = run(0.1)
    assert kept <= free // 2, (kept, free)
    assert sum(new[1:]) <= new[0]  # the first batch's shapes serve most later ones
    assert pad_kept <= pad_free + 0.06, (pad_kept, pad_free)
    L = _lengths(B, cap, prompt)
    a, b = plan_micro_batches(L, budget, n_dev), plan_micro_batches(L, budget, n_dev, new_shape_cost=0.5)
    assert [(p.length, p.rows.tolist()) for p in a] == [(p.length, p.rows.tolist()) for p in b]
    with pytest.raises(ValueError, match="new_shape_cost"):
        plan_micro_batches(L, budget, n_dev, new_shape_cost=-1)
