"""softgrpo_jax.rl objective: Gumbel / discrete log-probs, advantages, verl's PPO loss (docs/algorithm.md).

Every reference here is an independent NumPy (float64) transcription of the SPEC formulas, or hand values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softgrpo_jax import rl
from softgrpo_jax.rl import LossConfig
from tests.helpers import make_hf_model


# ------------------------------------------------------------------------------------------------ NumPy references
def np_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _np_q(logits, ids, kept=None):
    """q over the K ids, or over the kept ones only (0 elsewhere), and the slots that count."""
    P = np_softmax(np.asarray(logits, np.float64))
    kept = np.ones(len(ids), bool) if kept is None else np.asarray(kept, bool)
    if not kept.any():
        kept = np.ones_like(kept)
    pa = np.where(kept, P[ids], 0.0)
    return pa / pa.sum(), kept


def np_gumbel(logits, ids, ytil, kept=None):
    """SPEC 2.2, one position: logits [V], ids [K], ytil [K]; ``kept``: renormalise and average over those slots.
    (A clamped record changes gradients only, never the value.)"""
    q, kept = _np_q(logits, ids, kept)
    lam = np.log(q + 1e-6)
    z = np.clip(np.asarray(ytil, np.float64) - lam, -1.5, 3.0)
    phi = -z - np.exp(-z)
    m = (lam > -3) & kept
    if not m.any():
        m = kept
    return float((phi * m).sum() / m.sum())


def np_gumbel_grad(logits, ids, ytil, kept=None, clamped=None):
    """Analytic d/dlogits of SPEC 2.2: sum_k (m_k/M) 1[unclamped_k] (1 - e^-z_k) dlam_k/dlogits; a slot recorded
    as ``clamped`` contributes no gradient, and q runs over the ``kept`` slots."""
    logits = np.asarray(logits, np.float64)
    q, kept = _np_q(logits, ids, kept)
    lam = np.log(q + 1e-6)
    zr = np.asarray(ytil, np.float64) - lam
    z = np.clip(zr, -1.5, 3.0)
    m = (lam > -3) & kept
    free = (zr > -1.5) & (zr < 3.0)
    if clamped is not None:
        free &= ~np.asarray(clamped, bool)
    coef = m / m.sum() * free * (1 - np.exp(-z))  # dmean/dlam_k
    # lam_k = log(q_k + eps); q = softmax(logits[ids]) -> dq_k/dl_{ids_j} = q_k (delta_kj - q_j)
    dq = coef / (q + 1e-6)  # dmean/dq_k
    dla = q * (dq - (dq * q).sum())  # dmean/dlogits[ids_j]
    g = np.zeros_like(logits)
    np.add.at(g, ids, dla)
    return g


def np_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def np_gaussian(logits, ids, s, kept=None, std=0.05):
    q, kept = _np_q(logits, ids, kept)
    x = np.clip(s, q - 0.15, q + 0.15)
    lp = -((x - q) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    m = (q > 0.05) & kept
    return float((lp * m).sum() / m.sum())


def np_dirichlet(logits, ids, s, kept=None):
    q, kept = _np_q(logits, ids, kept)
    m = (q > 0.05) & kept
    lp = np.array([(c - 1) * math.log(x) - x - math.lgamma(c) if mk else 0.0 for c, x, mk in zip(q, s, m)])
    lp = np.clip(lp, -5, 3)
    return float((lp * m).sum() / m.sum())


def np_verl_loss(lp, old, ref, adv, mask, mode, lo=0.2, hi=0.2, c=3.0, coef=0.001):
    """verl v0.4 compute_policy_loss + kl_penalty(low_var_kl) + agg_loss, transcribed to NumPy."""
    lp, old, ref, adv = (np.asarray(a, np.float64) for a in (lp, old, ref, adv))
    if adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], lp.shape)
    m = np.asarray(mask, np.float64)
    r = np.exp(lp - old)
    l1 = -adv * r
    l2 = -adv * np.clip(r, 1 - lo, 1 + hi)
    lc = np.maximum(l1, l2)
    l3 = -adv * c
    pg = np.where(adv < 0, np.minimum(l3, lc), lc)
    d = ref - lp
    kl = np.clip(np.exp(d) - d - 1, -10, 10)

    def agg(x):
        if mode == "token-mean":
            return (x * m).sum() / m.sum()
        if mode == "seq-mean-token-sum":
            return (x * m).sum(-1).mean()
        return ((x * m).sum(-1) / m.sum(-1)).mean()

    def mmean(x):
        return (x * m).sum() / m.sum()

    return dict(loss=agg(pg) + coef * agg(kl), pg_loss=agg(pg), kl_loss=agg(kl), clipfrac=mmean(l2 > l1),
                clipfrac_dual=mmean((lc > l3) & (adv < 0)), ppo_kl=mmean(old - lp), ratio_mean=mmean(r))


# ------------------------------------------------------------------------------------------------ gumbel_logprob
PHI = lambda z: -z - math.exp(-z)  # noqa: E731


def _hand_case():
    # q over the K=4 ids is exactly [0.6, 0.3, 0.0999, 0.0001]; other vocab entries are arbitrary.
    V = 7
    ids = np.array([2, 0, 4, 6])
    q = np.array([0.6, 0.3, 0.0999, 0.0001])
    logits = np.array([0.0, 5.0, 0.0, -2.0, 0.0, 1.0, 0.0])
    logits[ids] = np.log(q)
    lam = np.log(q + 1e-6)  # lam_3 = log(1.01e-4) ~ -9.2 < -3: slot 3 is masked
    ytil = lam + np.array([0.7, -5.0, 4.0, 0.1])  # z = 0.7 (free), -1.5 (clamped), 3.0 (clamped), masked
    return V, ids, q, logits, lam, ytil


def test_gumbel_logprob_hand_values():
    V, ids, q, logits, lam, ytil = _hand_case()
    assert lam[3] < -3 < lam[2]
    expected = (PHI(0.7) + PHI(-1.5) + PHI(3.0)) / 3  # written out: (-1.196585 - 2.981689 - 3.049787) / 3
    assert abs(expected - (-2.409354)) < 1e-5
    got = rl.gumbel_logprob(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(ytil, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, atol=2e-5)
    # the masked slot's value does not matter; a free slot's does
    ytil2 = ytil.copy()
    ytil2[3] += 10.0
    got2 = rl.gumbel_logprob(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(ytil2, jnp.float32))
    np.testing.assert_allclose(float(got2), expected, atol=2e-5)
    assert np_gumbel(logits, ids, ytil) == pytest.approx(expected, abs=1e-9)


def test_gumbel_logprob_threshold_uses_lambda_with_eps():
    # q_1 = e^-3 - 5e-7: log(q_1) < -3 but lam_1 = log(q_1 + 1e-6) > -3, so the slot counts (SPEC: +1e-6 first)
    q1 = math.exp(-3) - 5e-7
    q = np.array([1 - q1 - 0.3, q1, 0.3])
    ids = np.array([0, 1, 2])
    logits = np.log(q)
    lam = np.log(q + 1e-6)
    assert math.log(q1) < -3 < lam[1]
    ytil = lam + np.array([0.5, 1.0, -0.2])
    got = float(rl.gumbel_logprob(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(ytil, jnp.float32)))
    np.testing.assert_allclose(got, (PHI(0.5) + PHI(1.0) + PHI(-0.2)) / 3, atol=2e-5)
    assert abs(got - (PHI(0.5) + PHI(-0.2)) / 2) > 1e-2


def test_gumbel_logprob_random_vs_numpy():
    rng = np.random.default_rng(0)
    N, V, K = 64, 50, 5
    logits = rng.normal(0, 2.5, (N, V))
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(N)])
    ytil = rng.normal(-1.5, 2.0, (N, K))  # spans both clamps and the threshold
    got = np.asarray(rl.gumbel_logprob(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                                       jnp.asarray(ytil, jnp.float32)))
    want = np.array([np_gumbel(logits[i], ids[i], ytil[i]) for i in range(N)])
    np.testing.assert_allclose(got, want, atol=3e-5)
    # the test set really exercises clamps on both sides and masked slots
    P = np_softmax(logits)
    pa = np.take_along_axis(P, ids, -1)
    lam = np.log(pa / pa.sum(-1, keepdims=True) + 1e-6)
    zr = ytil - lam
    assert (zr < -1.5).any() and (zr > 3).any() and (lam < -3).any()
    # batched leading dims
    got3 = rl.gumbel_logprob(jnp.asarray(logits, jnp.float32).reshape(4, 16, V), jnp.asarray(ids).reshape(4, 16, K),
                             jnp.asarray(ytil, jnp.float32).reshape(4, 16, K))
    np.testing.assert_allclose(np.asarray(got3).reshape(-1), want, atol=3e-5)


def test_gumbel_logprob_all_masked_is_finite():
    # K = 30 equal-probability ids: q = 1/30, lam = log(1/30) < -3 in every slot -> mean over all slots
    V, K = 40, 30
    logits = jnp.zeros((V,))
    ids = jnp.arange(K)
    ytil = jnp.linspace(-6, 2, K)
    got = rl.gumbel_logprob(logits, ids, ytil)
    lam = math.log(1 / K + 1e-6)
    want = np.mean([PHI(min(max(y - lam, -1.5), 3.0)) for y in np.linspace(-6, 2, K)])
    np.testing.assert_allclose(float(got), want, atol=1e-5)
    g = jax.grad(lambda l: rl.gumbel_logprob(l, ids, ytil))(logits)
    assert np.isfinite(np.asarray(g)).all()


def test_gumbel_logprob_gradient_hand_case():
    V, ids, q, logits, lam, ytil = _hand_case()
    g = np.asarray(jax.grad(rl.gumbel_logprob)(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                                               jnp.asarray(ytil, jnp.float32)))
    # only slot 0 (z = 0.7) is free: dmean/dlam_0 = (1 - e^-0.7) / 3, dlam_0/dl = (q_0 / (q_0 + 1e-6)) (e_0 - q)
    c = (1 - math.exp(-0.7)) / 3 * q[0] / (q[0] + 1e-6)
    want = np.zeros(V)
    want[ids] = c * (np.eye(4)[0] - q)
    np.testing.assert_allclose(g, want, atol=1e-6)
    assert np.all(g[[1, 3, 5]] == 0)  # ids not in the top-K get nothing


def test_gumbel_logprob_gradient_zero_when_all_clamped():
    V, ids, q, logits, lam, ytil = _hand_case()
    ytil = lam + np.array([-4.0, -5.0, 4.0, 0.1])  # every valid slot clamped
    g = jax.grad(rl.gumbel_logprob)(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(ytil, jnp.float32))
    assert np.all(np.asarray(g) == 0.0)


def test_gumbel_logprob_gradient_random_vs_analytic_and_fd():
    rng = np.random.default_rng(1)
    N, V, K = 24, 30, 5
    logits = rng.normal(0, 2.0, (N, V))
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(N)])
    ytil = rng.normal(-1.5, 2.0, (N, K))
    g = np.asarray(jax.grad(lambda l: rl.gumbel_logprob(l, jnp.asarray(ids), jnp.asarray(ytil, jnp.float32)).sum())(
        jnp.asarray(logits, jnp.float32)))
    want = np.stack([np_gumbel_grad(logits[i], ids[i], ytil[i]) for i in range(N)])
    np.testing.assert_allclose(g, want, atol=2e-5)
    # the analytic form itself against central finite differences (float64 NumPy)
    eps = 1e-6
    for i in range(4):
        fd = np.zeros(V)
        for v in range(V):
            lp, lm = logits[i].copy(), logits[i].copy()
            lp[v] += eps
            lm[v] -= eps
            fd[v] = (np_gumbel(lp, ids[i], ytil[i]) - np_gumbel(lm, ids[i], ytil[i])) / (2 * eps)
        np.testing.assert_allclose(want[i], fd, atol=1e-6)
    assert np.abs(want).max() > 1e-3


def _random_slots(seed, N=48, V=30, K=5):
    """Random positions with cut slots (never slot 0 of all) and clamped records, ytil spanning both clips."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (N, V))
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(N)])
    ytil = rng.normal(-1.5, 2.0, (N, K))
    kept = rng.random((N, K)) < 0.7
    kept[np.arange(N), rng.integers(0, K, N)] = True
    clamped = rng.random((N, K)) < 0.3
    return logits, ids, ytil, kept, clamped


def test_gumbel_logprob_kept_and_clamped_random_vs_numpy():
    """With the rollout's records: q renormalised over the kept slots, only kept slots averaged, clamped slots
    counted with no gradient; values and gradients against the float64 NumPy transcription."""
    logits, ids, ytil, kept, clamped = _random_slots(3)
    N, V = logits.shape
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.asarray(rl.gumbel_logprob(f32(logits), jnp.asarray(ids), f32(ytil), jnp.asarray(kept),
                                       jnp.asarray(clamped)))
    want = np.array([np_gumbel(logits[i], ids[i], ytil[i], kept[i]) for i in range(N)])
    np.testing.assert_allclose(got, want, atol=3e-5)
    old = np.array([np_gumbel(logits[i], ids[i], ytil[i]) for i in range(N)])
    assert np.abs(old - want).max() > 0.1  # the cut slots do change the value
    # records that keep every slot and clamp none are no records (values and gradients)
    ones, zeros = jnp.ones(kept.shape, bool), jnp.zeros(kept.shape, bool)

    def plain(lg, *records):
        return rl.gumbel_logprob(lg, jnp.asarray(ids), f32(ytil), *records).sum()

    np.testing.assert_array_equal(np.asarray(plain(f32(logits), ones, zeros)), np.asarray(plain(f32(logits))))
    np.testing.assert_array_equal(np.asarray(jax.grad(plain)(f32(logits), ones, zeros)),
                                  np.asarray(jax.grad(plain)(f32(logits))))

    def total(lg):
        return rl.gumbel_logprob(lg, jnp.asarray(ids), f32(ytil), jnp.asarray(kept), jnp.asarray(clamped)).sum()

    g = np.asarray(jax.grad(total)(f32(logits)))
    gw = np.stack([np_gumbel_grad(logits[i], ids[i], ytil[i], kept[i], clamped[i]) for i in range(N)])
    np.testing.assert_allclose(g, gw, atol=2e-5)
    assert np.abs(gw).max() > 1e-3
    # no gradient on the logits of cut ids (they hold no probability in the rollout), none from clamped slots
    cut_ids = np.zeros((N, V), bool)
    np.put_along_axis(cut_ids, ids, ~kept, axis=1)
    kept_ids = np.zeros((N, V), bool)
    np.put_along_axis(kept_ids, ids, kept, axis=1)
    assert np.all(g[cut_ids & ~kept_ids] == 0)
    # the other noises renormalise over the kept slots too
    s = np.abs(ytil) * 0.1 + 0.01
    for fn, ref in ((rl.gaussian_logprob, np_gaussian), (rl.dirichlet_logprob, np_dirichlet)):
        got = np.asarray(fn(f32(logits), jnp.asarray(ids), f32(s), jnp.asarray(kept)))
        want = np.array([ref(logits[i], ids[i], s[i], kept[i]) for i in range(N)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gumbel_logprob_top_p_kept_one_slot():
    """A step where top-p kept only slot 0 (the other slots hold the next-ranked tokens, probability 0 in the
    rollout): at the rollout policy z_0 = g_0 exactly, the value is phi(g_0), and no gradient leaks onto the cut
    tokens, however likely they are under the current policy; without the record it does."""
    V, K = 12, 5
    logits = np.linspace(2.0, -2.0, V)
    ids = np.arange(K)
    kept = np.array([True, False, False, False, False])
    g = np.array([0.4, 1.0, -0.5, 2.0, 0.2])
    ytil = np.log(kept + 1e-6) + g  # p_hat = [1, 0, ...]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    zr, _ = rl.gumbel_noise(f32(logits[ids]), f32(ytil), jnp.asarray(kept))
    assert abs(float(zr[0]) - g[0]) <= 1e-5
    v = float(rl.gumbel_logprob(f32(logits), jnp.asarray(ids), f32(ytil), jnp.asarray(kept)))
    np.testing.assert_allclose(v, PHI(g[0]), atol=1e-5)
    grad = np.asarray(jax.grad(lambda lg: rl.gumbel_logprob(lg, jnp.asarray(ids), f32(ytil), jnp.asarray(kept)))(
        f32(logits)))
    assert np.all(grad == 0)  # q_0 = 1 whatever the logits
    leak = np.asarray(jax.grad(lambda lg: rl.gumbel_logprob(lg, jnp.asarray(ids), f32(ytil)))(f32(logits)))
    assert np.abs(leak[1:K]).max() > 1e-2


@pytest.mark.parametrize("side", [-1.5, 3.0])
def test_clamped_slot_gradient_does_not_depend_on_rounding(side):
    """A slot whose noise was clamped has z on the clip boundary at the rollout policy; one float32 ulp decides
    whether the clip passes its gradient. With the clamped record it passes none on either side of the boundary,
    and the gradient equals the NumPy one with that slot held fixed."""
    K = 4
    logits = np.array([1.2, 0.3, -0.4, 0.9, -1.0, 0.1, 0.5, -0.2, 0.0], np.float32)
    ids = np.array([0, 3, 6, 1])
    lam = np.asarray(rl.gumbel_noise(jnp.asarray(logits[ids]), jnp.zeros((K,), jnp.float32))[1])
    assert np.all(lam > -3)
    base = (lam + np.array([side, 0.3, -0.8, 1.1], np.float32)).astype(np.float32)
    clamped = np.array([True, False, False, False])
    grads = {}
    for name, y0 in (("below", np.nextafter(base[0], np.float32(-np.inf))), ("at", base[0]),
                     ("above", np.nextafter(base[0], np.float32(np.inf)))):
        ytil = base.copy()
        ytil[0] = y0
        for rec in (True, False):
            f = lambda lg: rl.gumbel_logprob(lg, jnp.asarray(ids), jnp.asarray(ytil),  # noqa: E731
                                             clamped=jnp.asarray(clamped) if rec else None)
            grads[name, rec] = np.asarray(jax.grad(f)(jnp.asarray(logits)))
    want = np_gumbel_grad(logits, ids, base, clamped=clamped)
    for name in ("below", "at", "above"):
        np.testing.assert_array_equal(grads[name, True], grads["at", True])
        np.testing.assert_allclose(grads[name, True], want, atol=1e-6)
    # without the record, rounding decides: the three neighbouring values do not all give the same gradient
    spread = max(np.abs(grads[a, False] - grads[b, False]).max() for a in ("below", "at") for b in ("at", "above"))
    assert spread > 1e-2


def test_discrete_gaussian_dirichlet_vs_numpy():
    rng = np.random.default_rng(2)
    N, V, K = 32, 40, 5
    logits = rng.normal(0, 2.0, (N, V))
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(N)])
    lj, ij = jnp.asarray(logits, jnp.float32), jnp.asarray(ids)
    tok = rng.integers(0, V, N)
    np.testing.assert_allclose(np.asarray(rl.discrete_logprob(lj, jnp.asarray(tok))),
                               np_log_softmax(logits)[np.arange(N), tok], atol=2e-5)
    # gaussian: s ~ N(q, 0.05^2) plus some outliers beyond the +-0.15 clamp
    pa = np.take_along_axis(np_softmax(logits), ids, -1)
    q = pa / pa.sum(-1, keepdims=True)
    s = q + rng.normal(0, 0.1, q.shape)
    got = np.asarray(rl.gaussian_logprob(lj, ij, jnp.asarray(s, jnp.float32)))
    want = np.array([np_gaussian(logits[i], ids[i], s[i]) for i in range(N)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # dirichlet: s ~ Gamma(q, 1)
    s = rng.gamma(np.maximum(q, 1e-3), 1.0) + 1e-4
    got = np.asarray(rl.dirichlet_logprob(lj, ij, jnp.asarray(s, jnp.float32)))
    want = np.array([np_dirichlet(logits[i], ids[i], s[i]) for i in range(N)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ advantages
def test_group_advantages():
    rng = np.random.default_rng(3)
    r = rng.integers(0, 2, 24).astype(np.float64) + rng.normal(0, 0.3, 24)
    r[8:12] = 1.0  # a group with zero spread -> 0
    got = np.asarray(rl.group_advantages(jnp.asarray(r), 4))
    rg = r.reshape(6, 4)
    want = ((rg - rg.mean(1, keepdims=True)) / (rg.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[8:12] == 0)
    # hand values: group [0, 1, 1, 0]: mean .5, unbiased std sqrt(1/3)
    got = np.asarray(rl.group_advantages(jnp.array([0.0, 1.0, 1.0, 0.0]), 4))
    np.testing.assert_allclose(got, np.array([-1, 1, 1, -1]) * 0.5 / (math.sqrt(1 / 3) + 1e-6), rtol=1e-6)
    # group of one: mean 0, std 1
    np.testing.assert_allclose(np.asarray(rl.group_advantages(jnp.array([0.0, 1.0, 0.5]), 1)),
                               np.array([0.0, 1.0, 0.5]) / (1 + 1e-6), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(rl.group_advantages(jnp.asarray(r), 4, norm_by_std=False)),
                               (rg - rg.mean(1, keepdims=True)).reshape(-1), atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(jnp.zeros(10), 4)


# ------------------------------------------------------------------------------------------------ the loss
def _random_loss_inputs(seed=4, B=6, T=9):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-2.0, 1.0, (B, T))
    old = lp - rng.normal(0, 1.0, (B, T))  # ratios well outside [0.8, 1.2], some beyond 3
    ref = lp + rng.normal(0, 0.5, (B, T))
    adv = rng.normal(0, 1.0, B)
    lens = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None] < lens[:, None]
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_vs_numpy(mode):
    lp, old, ref, adv, mask = _random_loss_inputs()
    cfg = LossConfig(loss_agg_mode=mode)
    terms = rl.ppo_loss_terms(jnp.asarray(lp, jnp.float32), jnp.asarray(old, jnp.float32),
                              jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(mask), cfg)
    got = rl.finalize_metrics(terms, cfg)
    want = np_verl_loss(lp, old, ref, adv, mask, mode)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, atol=2e-6, err_msg=k)
    np.testing.assert_allclose(float(rl.combine_loss(terms, cfg)), want["loss"], rtol=2e-5)
    # all branches exercised: clip low (A<0, r<0.8), clip high (A>0, r>1.2), dual clip (A<0, r>3)
    assert float(got["clipfrac_low"]) > 0 and float(got["clipfrac_high"]) > 0 and float(got["clipfrac_dual"]) > 0
    np.testing.assert_allclose(float(got["clipfrac_low"] + got["clipfrac_high"]), want["clipfrac"], atol=1e-6)
    # gradient wrt logpi against central differences of the NumPy loss (zero where clipped / dual-clipped)
    g = np.asarray(jax.grad(lambda x: rl.combine_loss(rl.ppo_loss_terms(
        x, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask), cfg), cfg))(jnp.asarray(lp, jnp.float32)))
    eps = 1e-6
    fd = np.zeros_like(lp)
    for i, j in zip(*np.nonzero(mask)):
        a, b = lp.copy(), lp.copy()
        a[i, j] += eps
        b[i, j] -= eps
        fd[i, j] = (np_verl_loss(a, old, ref, adv, mask, mode)["loss"]
                    - np_verl_loss(b, old, ref, adv, mask, mode)["loss"]) / (2 * eps)
    np.testing.assert_allclose(g, fd, atol=2e-5, rtol=1e-3)
    r = np.exp(lp - old)
    A = np.broadcast_to(adv[:, None], lp.shape)
    clipped = mask & (((A > 0) & (r > 1.2)) | ((A < 0) & (r < 0.8)) | ((A < 0) & (r > 3)))
    assert clipped.any()
    # only the (tiny) KL gradient is left at clipped positions
    np.testing.assert_allclose(g[clipped], fd[clipped], atol=2e-5)
    assert np.abs(g[clipped]).max() < 0.01 * np.abs(g[mask & ~clipped]).max()


def test_loss_dual_clip_hand_values():
    # one token each: A = -1 with r = e^2 (dual clip -> 3), A = -1 with r = 0.5 (clip -> 0.8), A = 2 with r = 2
    lp = jnp.array([[2.0], [math.log(0.5)], [math.log(2.0)]])
    old = jnp.zeros((3, 1))
    adv = jnp.array([-1.0, -1.0, 2.0])
    mask = jnp.ones((3, 1), bool)
    cfg = LossConfig(use_kl_loss=False)
    m = rl.finalize_metrics(rl.ppo_loss_terms(lp, old, None, adv, mask, cfg), cfg)
    np.testing.assert_allclose(float(m["pg_loss"]), (3.0 + 0.8 - 2 * 1.2) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["clipfrac_dual"]), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["clipfrac_low"]), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["clipfrac_high"]), 1 / 3, rtol=1e-6)
    # without dual clip the first token costs e^2
    cfg2 = LossConfig(use_kl_loss=False, clip_ratio_c=None)
    m2 = rl.finalize_metrics(rl.ppo_loss_terms(lp, old, None, adv, mask, cfg2), cfg2)
    np.testing.assert_allclose(float(m2["pg_loss"]), (math.exp(2) + 0.8 - 2.4) / 3, rtol=1e-6)


def test_loss_invariants_and_empty_rows():
    lp, old, ref, adv, mask = _random_loss_inputs(seed=5)
    lpj = jnp.asarray(lp, jnp.float32)
    cfg = LossConfig()
    # old == current: ratio 1, nothing clipped, pg loss = -token-mean(A)
    m = rl.finalize_metrics(rl.ppo_loss_terms(lpj, lpj, lpj, jnp.asarray(adv), jnp.asarray(mask), cfg), cfg)
    assert float(m["ratio_mean"]) == 1.0 and float(m["clipfrac"]) == 0.0 and float(m["clipfrac_dual"]) == 0.0
    # policy == reference: KL exactly 0
    assert float(m["kl_loss"]) == 0.0 and float(m["kl_token"]) == 0.0
    A = np.broadcast_to(adv[:, None], lp.shape)
    np.testing.assert_allclose(float(m["pg_loss"]), -(A * mask).sum() / mask.sum(), rtol=1e-5)
    # k3 is >= 0 and matches hand values
    np.testing.assert_allclose(np.asarray(rl.kl_penalty(jnp.array([0.0, 0.0, 0.0]), jnp.array([1.0, -1.0, 50.0]))),
                               [math.e - 2, math.exp(-1), 10.0], rtol=1e-6)
    # an all-padding row changes nothing, in every aggregation mode, and garbage (inf) in padding does not leak
    for mode in rl.objective.AGG_MODES:
        c = LossConfig(loss_agg_mode=mode)
        base = rl.finalize_metrics(rl.ppo_loss_terms(lpj, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                                     jnp.asarray(mask), c), c)
        pad = lambda x, v: np.concatenate([x, np.full((1,) + x.shape[1:], v)], 0)  # noqa: E731
        ext = rl.finalize_metrics(rl.ppo_loss_terms(
            jnp.asarray(pad(lp, np.inf), jnp.float32), jnp.asarray(pad(old, -np.inf), jnp.float32),
            jnp.asarray(pad(ref, np.nan), jnp.float32), jnp.asarray(pad(adv, 5.0), jnp.float32),
            jnp.asarray(pad(mask, False)), c), c)
        for k in ("loss", "pg_loss", "kl_loss", "clipfrac", "ratio_mean"):
            np.testing.assert_allclose(float(ext[k]), float(base[k]), rtol=1e-6, err_msg=f"{mode} {k}")
        g = np.asarray(jax.grad(lambda x: rl.combine_loss(rl.ppo_loss_terms(
            x, jnp.asarray(pad(old, -np.inf), jnp.float32), jnp.asarray(pad(ref, np.nan), jnp.float32),
            jnp.asarray(pad(adv, 5.0), jnp.float32), jnp.asarray(pad(mask, False)), c), c))(
            jnp.asarray(pad(lp, np.inf), jnp.float32)))
        assert np.isfinite(g).all() and np.all(g[-1] == 0) and np.all(g[:-1][~mask] == 0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_accumulation_of_terms_equals_one_batch(mode):
    lp, old, ref, adv, mask = _random_loss_inputs(seed=6, B=8, T=7)
    cfg = LossConfig(loss_agg_mode=mode)
    f = lambda x, sl: rl.ppo_loss_terms(  # noqa: E731
        x, jnp.asarray(old[sl], jnp.float32), jnp.asarray(ref[sl], jnp.float32), jnp.asarray(adv[sl], jnp.float32),
        jnp.asarray(mask[sl]), cfg)
    full = f(jnp.asarray(lp, jnp.float32), slice(None))
    g_full = jax.grad(lambda x: rl.combine_loss(f(x, slice(None)), cfg))(jnp.asarray(lp, jnp.float32))
    norm = rl.loss_denominator(jnp.asarray(mask), cfg)
    acc, grads = None, []
    for sl in (slice(0, 3), slice(3, 5), slice(5, 8)):  # uneven micro-batches
        x = jnp.asarray(lp[sl], jnp.float32)
        acc = rl.accumulate_terms(acc, f(x, sl))
        grads.append(jax.grad(lambda x: rl.combine_loss(f(x, sl), cfg, normalizer=norm))(x))
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(g_full), rtol=1e-5, atol=1e-8)
    mf, ma = rl.finalize_metrics(full, cfg), rl.finalize_metrics(acc, cfg)
    for k in mf:
        np.testing.assert_allclose(float(ma[k]), float(mf[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_loss_config_validation():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        LossConfig(loss_agg_mode="token_mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossConfig(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="entropy_coeff"):
        LossConfig(entropy_coeff=0.01)
    hash(LossConfig())  # usable as a static jit argument


# ------------------------------------------------------------------------------------------------ token_logprobs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from softgrpo_jax.checkpoint.hf import load_hf

    path = str(tmp_path_factory.mktemp("rl_qwen2"))
    torch_model = make_hf_model(path, "qwen2", seed=0)
    return torch_model, load_hf(path)


PAD = 5


def make_batch(V, seed=0, K=3, P=5, R=8, tau=0.1):
    """Left-padded prompts, right-padded responses; soft thinking steps then discrete steps (verl layout)."""
    rng = np.random.default_rng(seed)
    prompt_lens, resp_lens, n_soft = [5, 3, 4, 2], [8, 6, 3, 7], [5, 2, 0, 4]
    B, T = len(prompt_lens), P + R
    tokens = np.full((B, T), PAD, np.int32)
    ids = np.full((B, T, K), PAD, np.int32)
    ytil = np.full((B, T, K), float(PAD), np.float32)  # verl fills padding with pad_token_id everywhere
    amask = np.zeros((B, T), bool)
    soft = np.zeros((B, T), bool)
    for b in range(B):
        for t in range(P - prompt_lens[b], P + resp_lens[b]):
            amask[b, t] = True
            if P <= t < P + n_soft[b]:
                row = rng.choice(np.arange(1, V), K, replace=False)
                p_hat = np.sort(rng.dirichlet(np.ones(K)))[::-1]
                g = np.clip(rng.gumbel(size=K), -1.5, 3)
                y = np.log(p_hat + 1e-6) + g
                order = np.argsort(-y)
                ids[b, t], ytil[b, t] = row[order], y[order]
                soft[b, t] = True
            else:
                ids[b, t] = [rng.integers(0, V)] + [0] * (K - 1)
                ytil[b, t] = rng.normal(0, 1, K)  # noisy leftovers the trainer must ignore at discrete steps
            tokens[b, t] = ids[b, t, 0]
    loss_mask = amask & (np.arange(T) >= P)[None]
    return dict(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(amask), topk_ids=jnp.asarray(ids),
                topk_ytil=jnp.asarray(ytil), soft_mask=jnp.asarray(soft), loss_mask=jnp.asarray(loss_mask),
                advantages=jnp.asarray(rng.normal(0, 1, B), jnp.float32), tau=jnp.float32(tau))


def reference_logprobs(torch_model, batch, tau, temperature):
    """Independent path: NumPy soft embeddings -> transformers (torch) model -> NumPy log-probs per position."""
    import torch

    E = torch_model.model.embed_tokens.weight.detach().numpy().astype(np.float64)
    ids, ytil = np.asarray(batch["topk_ids"]), np.asarray(batch["topk_ytil"], np.float64)
    soft, amask, tokens = np.asarray(batch["soft_mask"]), np.asarray(batch["attention_mask"]), np.asarray(
        batch["tokens"])
    B, T, K = ids.shape
    emb = np.zeros((B, T, E.shape[1]))
    for b in range(B):
        for t in range(T):
            w = np_softmax(ytil[b, t] / tau) if soft[b, t] else np.eye(K)[0]
            emb[b, t] = w @ E[ids[b, t]]
    pos = np.maximum(np.cumsum(amask, 1) - 1, 0)
    with torch.no_grad():
        logits = torch_model(inputs_embeds=torch.tensor(emb, dtype=torch.float32),
                             attention_mask=torch.tensor(amask.astype(np.int64)),
                             position_ids=torch.tensor(pos)).logits.double().numpy() / temperature
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            if not (amask[b, t] and amask[b, t - 1]):
                continue
            if soft[b, t]:
                out[b, t] = np_gumbel(logits[b, t - 1], ids[b, t], ytil[b, t])
            else:
                out[b, t] = np_log_softmax(logits[b, t - 1])[tokens[b, t]]
    return out


def test_token_logprobs_vs_independent_recomputation(tiny):
    torch_model, model = tiny
    batch = make_batch(model.config.vocab_size, seed=0)
    for tau, temp in ((0.1, 1.0), (0.5, 0.7)):
        got = np.asarray(rl.token_logprobs(model, batch, tau=tau, temperature=temp))
        want = reference_logprobs(torch_model, batch, tau, temp)
        m = np.asarray(batch["attention_mask"])
        valid = np.zeros_like(m)
        valid[:, 1:] = m[:, 1:] & m[:, :-1]
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
        assert np.all(got[~valid] == 0) and np.all(got[:, 0] == 0)
        soft = np.asarray(batch["soft_mask"])
        assert soft.sum() >= 8 and np.all(got[soft] <= -1.0 + 1e-6)  # Gumbel values are <= max(phi) = -1
    # per-row tau [B] equals the scalar
    b2 = dict(batch)
    np.testing.assert_allclose(np.asarray(rl.token_logprobs(model, b2, tau=jnp.full((4,), 0.1))),
                               np.asarray(rl.token_logprobs(model, batch, tau=0.1)), atol=1e-6)


def torch_policy_gradient_loss(torch_model, batch, tau):
    """Independent torch path of the policy-gradient surrogate at ratio 1: soft inputs (softmax(ytil / tau) of the K
    ids' embeddings, one-hot slot 0 at discrete steps, no gradient), the transformers model, the Gumbel density of
    the log-density of docs/algorithm.md at soft targets and log_softmax at discrete ones, -sum(adv * lp) / (scored tokens)."""
    import torch

    ids = torch.tensor(np.asarray(batch["topk_ids"], np.int64))
    ytil = torch.tensor(np.asarray(batch["topk_ytil"], np.float32))
    soft = torch.tensor(np.asarray(batch["soft_mask"], bool))
    am = torch.tensor(np.asarray(batch["attention_mask"], bool))
    w = torch.where(soft[..., None], torch.softmax(ytil / tau, -1), torch.eye(ids.shape[-1])[0])
    with torch.no_grad():
        emb = (w[..., None] * torch_model.model.embed_tokens.weight[ids]).sum(-2)
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    lg = torch_model(inputs_embeds=emb, attention_mask=am.long(), position_ids=pos).logits.float()[:, :-1]
    tokens = torch.tensor(np.asarray(batch["tokens"], np.int64))[:, 1:]
    disc_lp = torch.log_softmax(lg, -1).gather(-1, tokens[..., None])[..., 0]
    la = lg.gather(-1, ids[:, 1:])
    kept = batch.get("topk_kept")
    kept = torch.ones(la.shape, dtype=torch.bool) if kept is None else torch.tensor(np.asarray(kept, bool))[:, 1:]
    kept = kept | ~kept.any(-1, keepdim=True)
    lam = torch.log(torch.softmax(la.masked_fill(~kept, float("-inf")), -1) + 1e-6)
    raw = ytil[:, 1:] - lam
    z = torch.clamp(raw, -1.5, 3.0)
    if batch.get("topk_clamped") is not None:  # recorded clamped slots: value kept, gradient cut
        z = torch.where(torch.tensor(np.asarray(batch["topk_clamped"], bool))[:, 1:], z.detach(), z)
    keep = ((lam > -3) & kept).float().detach()
    soft_lp = ((-z - torch.exp(-z)) * keep).sum(-1) / keep.sum(-1).clamp(min=1)
    lp = torch.where(soft[:, 1:], soft_lp, disc_lp)
    valid = (am[:, 1:] & am[:, :-1] & torch.tensor(np.asarray(batch["loss_mask"], bool))[:, 1:]).float()
    adv = torch.tensor(np.asarray(batch["advantages"], np.float32))[:, None]
    return -(adv * lp * valid).sum() / valid.sum(), raw.detach().numpy(), (valid[..., None] * keep).bool().numpy()


def test_loss_gradient_vs_torch_autograd(tiny):
    """The trainer's loss (``loss_fn``, on-policy: ratio 1, no KL) has the gradient of -sum(adv * lp) / N, and it
    equals torch autograd through transformers' model and the Gumbel density written in torch, for every parameter:
    soft and discrete targets, slots clamped by the clip (no gradient) and inside it. No slot sits on a clip
    boundary (there, without the slot records, float rounding decides whether a slot gets gradient: docs/algorithm.md,
    "Quirks of the original", 8)."""
    from softgrpo_jax.checkpoint.hf import hf_name_to_param

    torch_model, model = tiny
    batch = make_batch(model.config.vocab_size, seed=3)
    tau = 0.1
    graphdef, params = nnx.split(model)
    lp = rl.token_logprobs(model, batch, tau=tau)
    (_, _), g = jax.value_and_grad(
        lambda p: rl.loss_fn(p, batch, lp, None, LossConfig(), graphdef=graphdef), has_aux=True)(params)
    jg = {path[-1]: np.asarray(v.get_value(), np.float64) for path, v in nnx.to_flat_state(g)}

    torch_model.zero_grad()
    loss, z, scored = torch_policy_gradient_loss(torch_model, batch, tau)
    loss.backward()
    zs = z[scored & np.asarray(batch["soft_mask"])[:, 1:, None]]
    inside = (zs > -1.5) & (zs < 3)
    assert (~inside).sum() >= 3 and inside.sum() >= 10  # slots clamped by the clip and slots inside it
    assert np.abs(zs - 3).min() > 1e-2 and np.abs(zs + 1.5).min() > 1e-2
    compared = set()
    for name, prm in torch_model.named_parameters():
        leaf, layer, tr = hf_name_to_param(name)
        compared.add(leaf)
        got = jg[leaf] if layer is None else jg[leaf][layer]
        got = got.T if tr else got
        if prm.grad is None:  # the input embedding of an untied model: inputs are rebuilt without gradient
            assert name == "model.embed_tokens.weight" and not np.any(got), name
            continue
        want = prm.grad.double().numpy()
        assert np.linalg.norm(want) > 0, name
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-3, (name, rel)
    assert compared == set(jg)  # every parameter of ours was compared


def _tiny_rollout(model, top_p=0.7, n=2, steps=10, seed=0):
    """A real Gumbel rollout of the tiny model (K = top_k = 5): top-p 0.7 cuts slots at many steps."""
    from softgrpo_jax.rl.trainer import rollout_to_batch
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    cfg = SamplingConfig(mode="gumbel", max_topk=5, top_k=5, top_p=top_p, tau=0.1, max_new_tokens=steps)
    key = jax.random.key(seed)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
    r = RolloutEngine(model, cfg, pad_id=0).generate(prompts, key, n=n)
    adv = np.random.default_rng(seed).normal(0, 1, r.batch_size).astype(np.float32)
    return r, rollout_to_batch(r, adv), key, cfg


def _sampled_noise(batch, logits, key, n_prompt, K):
    """The noise the rollout drew for each stored slot, from its PRNG keys (as the engine folds them) in the order
    of the rollout's probabilities (float64 logits at the step), then permuted to the stored slot order."""
    B, T, _ = batch["topk_ids"].shape
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))
    g = np.zeros((B, T, K))
    for b in range(B):
        for t in range(n_prompt, T):
            if not batch["soft_mask"][b, t]:
                continue
            k_noise, _ = jax.random.split(jax.random.fold_in(row_keys[b], t - n_prompt))
            g_ranked = np.clip(-np.log(np.asarray(jax.random.exponential(k_noise, (K,)), np.float64)), -1.5, 3.0)
            ids = batch["topk_ids"][b, t]
            rank = np.argsort(np.argsort(-logits[b, t - 1, ids], kind="stable"), kind="stable")
            g[b, t] = g_ranked[rank]
    return g


def test_implied_noise_of_kept_slots_is_the_sampled_noise(tiny):
    """At the rollout policy, through rollout_to_batch and the trainer's forward, the noise the loss implies for
    every kept slot equals the noise the rollout drew (float32, <= 1e-5), on steps where top-p cut slots too, and
    token_logprobs gives the NumPy Gumbel density of that noise over the kept slots. Without the kept record the
    cut tokens' probabilities shift the kept slots' noise."""
    _, model = tiny
    r, batch, key, cfg = _tiny_rollout(model)
    K, n_prompt = cfg.max_topk, r.prompt_tokens.shape[1]
    soft = batch["soft_mask"]
    kept = batch["topk_kept"]
    cut_steps = soft & ~kept.all(-1)
    assert soft.sum() >= 40 and cut_steps.sum() >= 10
    emb = rl.rebuild_inputs(model.embedding_table(), batch, tau=batch["tau"])
    logits = np.asarray(model(inputs_embeds=emb, attention_mask=jnp.asarray(batch["attention_mask"])), np.float64)
    g = _sampled_noise(batch, logits, key, n_prompt, K)
    la = jnp.asarray(np.take_along_axis(logits[:, :-1], batch["topk_ids"][:, 1:], -1), jnp.float32)
    zr, lam = (np.asarray(a) for a in rl.gumbel_noise(la, batch["topk_ytil"][:, 1:], kept[:, 1:]))
    sel = soft[:, 1:, None] & kept[:, 1:]
    err = np.abs(zr - g[:, 1:])[sel]
    assert err.max() <= 1e-5, err.max()
    assert np.abs(zr - g[:, 1:])[sel & cut_steps[:, 1:, None]].max() <= 1e-5
    zr_all, _ = (np.asarray(a) for a in rl.gumbel_noise(la, batch["topk_ytil"][:, 1:]))
    assert np.abs(zr_all - g[:, 1:])[sel & cut_steps[:, 1:, None]].max() > 1e-2
    # the trainer's log-density = the NumPy Gumbel density of the drawn noise over the kept slots with lam > -3
    lp = np.asarray(rl.token_logprobs(model, batch, tau=batch["tau"]))
    for b, t in zip(*np.nonzero(soft)):
        m = kept[b, t] & (lam[b, t - 1] > -3)
        want = np.mean((-g[b, t] - np.exp(-g[b, t]))[m])
        np.testing.assert_allclose(lp[b, t], want, atol=1e-4)
        np.testing.assert_allclose(lp[b, t], np_gumbel(logits[b, t - 1], batch["topk_ids"][b, t],
                                                       batch["topk_ytil"][b, t], kept[b, t]), atol=1e-4)
    legacy = dict(batch)
    del legacy["topk_kept"], legacy["topk_clamped"]
    assert np.abs(np.asarray(rl.token_logprobs(model, legacy, tau=batch["tau"])) - lp)[soft].max() > 0.05


def test_loss_gradient_on_a_rollout_vs_torch_autograd(tiny):
    """On a real rollout (top-p 0.7: cut slots; clamped noise: slots on the clip boundary) at the rollout policy,
    the loss gradient with the kept / clamped records equals torch autograd through transformers' model with the
    same rule written in torch, for every parameter. Without the records the gradient is another one."""
    from softgrpo_jax.checkpoint.hf import hf_name_to_param

    torch_model, model = tiny
    r, batch, _, _ = _tiny_rollout(model, seed=1)
    tau = float(batch["tau"][0])
    graphdef, params = nnx.split(model)

    def jax_grads(bt):
        lp = rl.token_logprobs(model, bt, tau=tau)
        g = jax.grad(lambda p: rl.loss_fn(p, bt, lp, None, LossConfig(), graphdef=graphdef)[0])(params)
        return {path[-1]: np.asarray(v.get_value(), np.float64) for path, v in nnx.to_flat_state(g)}

    jg = jax_grads(batch)
    legacy = dict(batch)
    del legacy["topk_kept"], legacy["topk_clamped"]
    jg_legacy = jax_grads(legacy)

    torch_model.zero_grad()
    loss, z, scored = torch_policy_gradient_loss(torch_model, batch, tau)
    loss.backward()
    on_clip = scored & batch["topk_clamped"][:, 1:]
    assert on_clip.sum() >= 5 and np.abs(np.abs(z[on_clip] - 0.75) - 2.25).max() < 1e-4  # z = -1.5 or 3
    assert (batch["soft_mask"][:, :, None] & ~batch["topk_kept"]).sum() >= 10
    worst_legacy = 0.0
    for name, prm in torch_model.named_parameters():
        leaf, layer, tr = hf_name_to_param(name)
        got, old = (x[leaf] if layer is None else x[leaf][layer] for x in (jg, jg_legacy))
        got, old = (x.T if tr else x for x in (got, old))
        if prm.grad is None:
            continue
        want = prm.grad.double().numpy()
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-3, (name, rel)
        worst_legacy = max(worst_legacy, np.linalg.norm(old - want) / np.linalg.norm(want))
    assert worst_legacy > 1e-2


def test_token_logprobs_discrete_from_ids(tiny):
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=1)
    a = rl.token_logprobs(model, batch, tau=0.1)
    b = rl.token_logprobs(model, batch, tau=0.1, discrete_from_ids=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # consistent masks agree
    # the original's quirk: a soft step whose slots 1..K-1 hold id 0 is read as discrete
    ids = np.asarray(batch["topk_ids"]).copy()
    ids[0, 5, 1:] = 0
    qb = dict(batch, topk_ids=jnp.asarray(ids))
    c = np.asarray(rl.token_logprobs(model, qb, tau=0.1, discrete_from_ids=True))
    d = np.asarray(rl.token_logprobs(model, qb, tau=0.1))
    assert abs(c[0, 5] - d[0, 5]) > 1e-3


def test_token_logprobs_other_noises(tiny):
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=2)
    # the stored "gumbel" slot holds the noisy value s itself; the input is still softmax(s / tau) (SPEC 2.3)
    ids, s = np.asarray(batch["topk_ids"]), np.abs(np.asarray(batch["topk_ytil"], np.float64)) * 0.1 + 0.01
    sb = dict(batch, topk_ytil=jnp.asarray(s, jnp.float32))
    emb = rl.rebuild_inputs(model.embedding_table(), sb, tau=0.1)
    logits = np.asarray(model(inputs_embeds=emb, attention_mask=batch["attention_mask"]), np.float64)
    soft = np.asarray(batch["soft_mask"])
    for noise, ref in (("gaussian", np_gaussian), ("dirichlet", np_dirichlet)):
        got = np.asarray(rl.token_logprobs(model, sb, tau=0.1, noise=noise))
        for b, t in zip(*np.nonzero(soft)):
            np.testing.assert_allclose(got[b, t], ref(logits[b, t - 1], ids[b, t], s[b, t]), rtol=1e-4, atol=1e-4)


def test_token_logprobs_chunked_equals_unchunked(tiny):
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=3)
    full = rl.token_logprobs(model, batch, tau=0.1)
    for c in (4, 5):  # T - 1 = 12: even and ragged chunking
        np.testing.assert_allclose(np.asarray(rl.token_logprobs(model, batch, tau=0.1, chunk_size=c)),
                                   np.asarray(full), atol=1e-6)
    # gradients too (the chunk body is rematerialised)
    w = jnp.asarray(np.random.default_rng(0).normal(size=full.shape), jnp.float32)

    def f(m, c):
        return jnp.sum(w * rl.token_logprobs(m, batch, tau=0.1, chunk_size=c))

    g1 = nnx.jit(nnx.grad(functools.partial(f, c=None)))(model)
    g2 = nnx.jit(nnx.grad(functools.partial(f, c=5)))(model)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_token_logprobs_score_mask(tiny):
    """Positions outside score_mask return 0; the others equal the unmasked values (soft and discrete alike), and
    a mask of soft targets only still scores them (their K-id logits need no vocabulary pass)."""
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=4)
    full = np.asarray(rl.token_logprobs(model, batch, tau=0.1))
    rng = np.random.default_rng(0)
    for sm in (np.asarray(batch["loss_mask"]), rng.random(full.shape) < 0.5, np.asarray(batch["soft_mask"])):
        got = np.asarray(rl.token_logprobs(model, batch, tau=0.1, score_mask=jnp.asarray(sm), chunk_size=3))
        np.testing.assert_allclose(got[sm], full[sm], atol=1e-6)
        assert np.all(got[~sm] == 0)
    assert np.all(got[np.asarray(batch["soft_mask"])] <= -1.0 + 1e-6)


def test_token_logprobs_ignore_ytil_outside_soft_steps(tiny):
    """ytil at padding and at discrete steps (NaN, huge) changes neither the log-probs nor the gradient, which
    stays finite: a masked-out branch must not carry 0 * NaN back."""
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=5)
    outside = ~(np.asarray(batch["attention_mask"]) & np.asarray(batch["soft_mask"]))
    y = np.asarray(batch["topk_ytil"]).copy()
    y[outside] = np.nan
    y[outside & (np.arange(y.shape[1]) % 2 == 0)[None]] = 1e30
    dirty = {**batch, "topk_ytil": jnp.asarray(y)}
    w = jnp.asarray(batch["loss_mask"], jnp.float32)

    def f(m, b):
        return jnp.sum(w * rl.token_logprobs(m, b, tau=0.1))

    clean_lp, dirty_lp = (np.asarray(rl.token_logprobs(model, b, tau=0.1)) for b in (batch, dirty))
    np.testing.assert_array_equal(dirty_lp, clean_lp)
    g1, g2 = (nnx.jit(nnx.grad(f))(model, b) for b in (batch, dirty))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


# ------------------------------------------------------------------------------------------------ loss_fn on a model
def _named_grads(grads):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(grads)}


def test_loss_fn_gradients_reach_only_the_policy(tiny):
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=4)
    cfg = LossConfig()
    lp = rl.token_logprobs(model, batch, tau=0.1)
    noise = jnp.asarray(np.random.default_rng(1).normal(0, 0.3, lp.shape), jnp.float32)
    old, ref = lp + noise, lp - noise
    # on-policy: ratio exactly 1, policy == reference: KL exactly 0
    loss, terms = rl.loss_fn(model, batch, lp, lp, cfg)
    m = rl.finalize_metrics(terms, cfg)
    assert float(m["ratio_mean"]) == 1.0 and float(m["kl_loss"]) == 0.0 and float(m["clipfrac"]) == 0.0
    assert 0 < float(m["soft_fraction"]) < 1
    graphdef, state = nnx.split(model)  # the (state, graphdef) form gives the same loss
    np.testing.assert_allclose(float(rl.loss_fn(state, batch, old, ref, cfg, graphdef=graphdef)[0]),
                               float(rl.loss_fn(model, batch, old, ref, cfg)[0]), rtol=1e-6)

    # the untied input table gets exactly zero gradient (inputs rebuilt under stop_gradient); other params get some
    grads = _named_grads(nnx.jit(nnx.grad(lambda mdl: rl.loss_fn(mdl, batch, old, ref, cfg)[0]))(model))
    assert any("embed" in k for k in grads) and any("lm_head" in k for k in grads)
    for k, g in grads.items():
        if "embed" in k:
            assert np.all(g == 0), k
        else:
            assert np.abs(g).max() > 0, k

    # a reference (and old policy) evaluated inside the differentiated function still receives no gradient,
    # and the policy's gradient is the same as with precomputed arrays
    ref_model = nnx.clone(model)

    def both(policy, reference):
        r = rl.token_logprobs(reference, batch, tau=0.1) - noise
        o = rl.token_logprobs(policy, batch, tau=0.1) + noise
        return rl.loss_fn(policy, batch, o, r, cfg)[0]

    gp, gr = nnx.jit(nnx.grad(both, argnums=(0, 1)))(model, ref_model)
    for k, g in _named_grads(gr).items():
        assert np.all(g == 0), k
    gp = _named_grads(gp)
    for k in grads:
        np.testing.assert_allclose(gp[k], grads[k], rtol=1e-4, atol=1e-7)


def test_loss_fn_micro_batch_accumulation_equals_one_batch(tiny):
    _, model = tiny
    batch = make_batch(model.config.vocab_size, seed=5)
    cfg = LossConfig()  # token-mean: the two micro-batches hold 14 and 10 scored tokens, so naive averaging differs
    lp = rl.token_logprobs(model, batch, tau=0.1)
    noise = jnp.asarray(np.random.default_rng(2).normal(0, 0.5, lp.shape), jnp.float32)
    old, ref = lp + noise, lp - noise
    vg = nnx.jit(nnx.value_and_grad(rl.loss_fn, has_aux=True), static_argnums=4)
    (loss, terms), g_full = vg(model, batch, old, ref, cfg)
    norm = rl.loss_denominator(batch["loss_mask"], cfg)
    acc, g_acc, loss_acc = None, None, 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        mb = {k: (v[sl] if k != "tau" else v) for k, v in batch.items()}
        (l, t), g = vg(model, mb, old[sl], ref[sl], cfg, normalizer=norm)
        loss_acc += float(l)
        acc = rl.accumulate_terms(acc, t)
        g_acc = g if g_acc is None else jax.tree.map(jnp.add, g_acc, g)
    np.testing.assert_allclose(loss_acc, float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(rl.finalize_metrics(acc, cfg)["loss"]), float(loss), rtol=1e-5)
    ga, gf = _named_grads(g_acc), _named_grads(g_full)
    for k in gf:
        np.testing.assert_allclose(ga[k], gf[k], rtol=1e-4, atol=1e-7, err_msg=k)
    assert max(np.abs(v).max() for v in gf.values()) > 0
    # verl's own scheme (mean of micro-batch means) is a different number here
    naive = sum(float(rl.combine_loss(rl.ppo_loss_terms(lp[sl], old[sl], ref[sl], batch["advantages"][sl],
                                                        batch["loss_mask"][sl], cfg), cfg)) for sl in
                (slice(0, 2), slice(2, 4))) / 2
    assert abs(naive - float(loss)) > 1e-4
