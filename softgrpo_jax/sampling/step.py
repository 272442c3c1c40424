"""One decoding step for a batch of rows in mixed modes (docs/algorithm.md, "Rollout step", "Discrete steps and the end of thinking"), as pure array code.

Modes per row (int32): ``DISCRETE`` (ordinary sampling), ``SOFT`` (Soft-Thinking: the next input is the top-K
renormalised probabilities times their embeddings, no noise) and ``GUMBEL`` (SofT-GRPO: clamped Gumbel noise on
log(p_hat + 1e-6), weights softmax(ytil / tau), slots sorted by weight, the emitted id is the argmax). Soft and Gumbel
rows only think softly while their ``thinking`` flag is set; afterwards they decode discretely.

Everything works in the space of the top-``M`` tokens (M = the largest of top_k / after_thinking_top_k / K, or the
whole vocabulary when a top-k filter is disabled): filtering, renormalisation and sampling are exact there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DISCRETE, SOFT, GUMBEL = 0, 1, 2
MODES = {"discrete": DISCRETE, "soft": SOFT, "gumbel": GUMBEL}
LOGP_EPS = 1e-6
GUMBEL_CLIP = (-1.5, 3.0)  # the clamp of the rollout's noise and of the trainer's implied noise (rl.logprobs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (static). Defaults are the SofT-GRPO training rollout (docs/algorithm.md, "Settings of the original runs")."""

    mode: str = "gumbel"  # default mode of every row: discrete | soft | gumbel
    max_topk: int = 5  # K: slots of a soft step
    temperature: float = 1.0
    top_k: int = 5  # <= 0 disables
    top_p: float = 0.95
    min_p: float = 0.0
    after_thinking_temperature: float | None = None  # None: same as temperature
    after_thinking_top_k: int | None = None  # None: same as top_k
    after_thinking_top_p: float | None = None
    after_thinking_min_p: float | None = None
    faithful_temperature: bool = False  # True: ignore after_thinking_temperature, as the original (SPEC 1.4)
    tau: float = 0.1  # gumbel_softmax_temperature
    noise: str = "gumbel"  # gumbel | gaussian | dirichlet (what a GUMBEL-mode row adds; SPEC 2.3 ablations)
    noise_factor: float = 1.0
    gaussian_sigma: float = 0.05
    dirichlet_alpha: float = 1.0
    think_end_match: str = "full"  # full: the whole tokenisation of think_end; last_subtoken: the original's test
    early_stopping_entropy_threshold: float = 0.0  # cold stop; 0 disables (the SofT-GRPO setting)
    early_stopping_length_threshold: int = 256
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"sampling mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.noise not in ("gumbel", "gaussian", "dirichlet"):
            raise ValueError(f"noise must be gumbel, gaussian or dirichlet, got {self.noise!r}")
        if self.think_end_match not in ("full", "last_subtoken"):
            raise ValueError(f"think_end_match must be 'full' or 'last_subtoken', got {self.think_end_match!r}")
        if self.max_topk < 1:
            raise ValueError("max_topk must be >= 1")

    # resolved after-thinking values
    @property
    def at_temperature(self):
        if self.faithful_temperature or self.after_thinking_temperature is None:
            return self.temperature
        return self.after_thinking_temperature

    @property
    def at_top_k(self):
        return self.top_k if self.after_thinking_top_k is None else self.after_thinking_top_k

    @property
    def at_top_p(self):
        return self.top_p if self.after_thinking_top_p is None else self.after_thinking_top_p

    @property
    def at_min_p(self):
        return self.min_p if self.after_thinking_min_p is None else self.after_thinking_min_p

    def candidates(self, vocab_size: int) -> int:
        """M: how many top tokens the step looks at."""
        ks = [self.top_k, self.at_top_k]
        if any(k <= 0 for k in ks):
            return vocab_size
        return min(vocab_size, max(ks + [self.max_topk]))

    def rollout_tau(self, mode: int) -> float:
        """The tau that rebuilds a row's soft inputs from ytil: tau for Gumbel rows, 1 for plain soft rows."""
        return self.tau if mode == GUMBEL else 1.0


def filter_sorted(p: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """top-k, then top-p, then min-p renormalisation of descending-sorted probabilities p [..., M].

    top_k <= 0 disables top-k; top-p keeps the smallest prefix whose mass reaches top_p (flashinfer semantics:
    a token is kept when the mass before it is below top_p); min-p keeps p >= min_p * max(p).
    """
    M = p.shape[-1]
    r = jnp.arange(M)
    top_k = jnp.asarray(top_k)[..., None]
    p = jnp.where((top_k <= 0) | (r < top_k), p, 0.0)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    before = jnp.cumsum(p, axis=-1) - p
    p = jnp.where((r == 0) | (before < jnp.asarray(top_p)[..., None]), p, 0.0)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    min_p = jnp.asarray(min_p)[..., None]
    p = jnp.where((min_p <= 0) | (p >= min_p * p[..., :1]), p, 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def _sort_slots(ytil, *arrays):
    # y is a monotone function of ytil for every noise, so sorting by ytil gives the original's order by y
    # without the float32 underflow ties of y (slots cut by top-p have y == 0 at tau = 0.1).
    order = jnp.argsort(-ytil, axis=-1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order, axis=-1)  # noqa: E731
    return (take(ytil),) + tuple(take(a) for a in arrays)


def step(cfg: SamplingConfig, logits: jax.Array, keys: jax.Array, mode: jax.Array, thinking: jax.Array):
    """Sample one step for every row.

    logits [B, V] float32 raw logits; keys [B] per-row PRNG keys; mode [B] int32; thinking [B] bool.
    Returns a dict of [B, ...] arrays: ``token`` (emitted id), ``ids`` [B, K], ``weights`` [B, K] (the input
    mixture for the next step; one-hot on slot 0 for discrete steps), ``ytil`` [B, K], ``kept`` [B, K] (the slot's
    token survived top-k / top-p / min-p, i.e. p_hat > 0; slot 0 only for discrete steps), ``clamped`` [B, K] (the
    noise the slot received, ``noise_factor * g``, lies on or outside the log-density's clip [-1.5, 3]; Gumbel steps
    only), ``soft`` [B] (this step was a soft step), ``logprob`` [B] (rollout log-prob: discrete log softmax(l/T)[x]
    before filtering, or the Gumbel log-density of the noise for Gumbel steps, mean over slots with lp > -3),
    ``entropy`` [B], and the row's temperature ``temperature`` [B] with ``lse`` [B] = logsumexp(logits / temperature).
    """
    B, V = logits.shape
    K = cfg.max_topk
    M = cfg.candidates(V)
    soft_row = thinking & (mode != DISCRETE)
    T = jnp.where(soft_row, cfg.temperature, cfg.at_temperature).astype(jnp.float32)
    lt = logits.astype(jnp.float32) / T[:, None]
    lse = jax.nn.logsumexp(lt, axis=-1)
    if M == V:
        top_l, top_i = jax.lax.sort_key_val(-lt, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), lt.shape))
        top_l = -top_l
    else:
        top_l, top_i = jax.lax.top_k(lt, M)
    top_i = top_i.astype(jnp.int32)
    p_sorted = jnp.exp(top_l - lse[:, None])
    if cfg.early_stopping_entropy_threshold > 0:
        pf = jnp.exp(lt - lse[:, None])
        entropy = -jnp.sum(pf * jnp.log(jnp.maximum(pf, 1e-12)), axis=-1)
    else:
        entropy = jnp.zeros((B,), jnp.float32)

    tk = jnp.where(soft_row, cfg.top_k, cfg.at_top_k)
    tp = jnp.where(soft_row, cfg.top_p, cfg.at_top_p)
    mp = jnp.where(soft_row, cfg.min_p, cfg.at_min_p)
    pf = filter_sorted(p_sorted, tk, tp, mp)

    k_noise, k_disc = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)

    # ---- soft / gumbel step on the K best slots
    p_hat = pf[:, :K] / jnp.sum(pf[:, :K], axis=-1, keepdims=True)
    ids = top_i[:, :K]
    # the original leaves the slots the filters removed at probability exactly 0 (torch.topk fills them with
    # other ids); the trainer needs to know which slots those are to renormalise over the kept ones only
    kept = pf[:, :K] > 0
    lp = jnp.log(p_hat + LOGP_EPS)
    clamped = jnp.zeros((B, K), bool)
    if cfg.noise == "gumbel":
        e = jax.vmap(lambda k: jax.random.exponential(k, (K,)))(k_noise)
        g = jnp.clip(-jnp.log(e), *GUMBEL_CLIP)
        # at the rollout policy the trainer's implied noise is noise_factor * g; where that sits on (or beyond) the
        # log-density's clip, float rounding alone would decide its gradient, so record it
        cg = cfg.noise_factor * g
        clamped = (cg <= GUMBEL_CLIP[0]) | (cg >= GUMBEL_CLIP[1])
        ytil_n = lp + cg
        y_n = jax.nn.softmax(ytil_n / cfg.tau, axis=-1)
        noise_lp = jnp.sum(jnp.where(lp > -3, -g - jnp.exp(-g), 0.0), -1) / jnp.maximum(jnp.sum(lp > -3, -1), 1)
    elif cfg.noise == "gaussian":
        s = p_hat + cfg.gaussian_sigma * jax.vmap(lambda k: jax.random.normal(k, (K,)))(k_noise)
        ytil_n = s
        y_n = s / jnp.sum(s, axis=-1, keepdims=True)
        noise_lp = jnp.zeros((B,), jnp.float32)
    else:
        s = jax.vmap(lambda k, a: jax.random.gamma(k, a))(k_noise, jnp.maximum(p_hat * cfg.dirichlet_alpha, 1e-6))
        ytil_n = s
        y_n = s / jnp.sum(s, axis=-1, keepdims=True)
        noise_lp = jnp.zeros((B,), jnp.float32)
    is_gumbel = (mode == GUMBEL)[:, None]
    y = jnp.where(is_gumbel, y_n, p_hat)
    ytil = jnp.where(is_gumbel, ytil_n, lp)
    clamped = clamped & is_gumbel
    ytil, y, ids, kept, clamped = _sort_slots(ytil, y, ids, kept, clamped)

    # ---- discrete step: sample from the filtered distribution
    choice = jax.vmap(jax.random.categorical)(k_disc, jnp.log(pf))
    disc_tok = jnp.take_along_axis(top_i, choice[:, None], axis=-1)[:, 0]
    disc_lp = jnp.take_along_axis(top_l, choice[:, None], axis=-1)[:, 0] - lse
    onehot = (jnp.arange(K) == 0).astype(jnp.float32)

    token = jnp.where(soft_row, ids[:, 0], disc_tok)
    out_ids = jnp.where(soft_row[:, None], ids, jnp.zeros_like(ids).at[:, 0].set(disc_tok))
    weights = jnp.where(soft_row[:, None], y, onehot[None, :])
    out_ytil = jnp.where(soft_row[:, None], ytil, 0.0)
    out_kept = jnp.where(soft_row[:, None], kept, onehot[None, :] > 0)
    out_clamped = clamped & soft_row[:, None]
    # logged log-prob: the Gumbel density for Gumbel soft steps, the discrete log-prob otherwise
    soft_tok_lp = jnp.take_along_axis(top_l, jnp.zeros((B, 1), jnp.int32), axis=-1)[:, 0] - lse
    logprob = jnp.where(soft_row & (mode == GUMBEL), noise_lp, jnp.where(soft_row, soft_tok_lp, disc_lp))
    return dict(token=token, ids=out_ids, weights=weights, ytil=out_ytil, kept=out_kept, clamped=out_clamped,
                soft=soft_row, logprob=logprob, entropy=entropy, lse=lse, temperature=T)
