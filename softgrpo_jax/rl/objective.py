"""The GRPO / SofT-GRPO objective: group advantages and verl's clipped PPO loss with a k3 KL (docs/algorithm.md, "Objective").

Soft and discrete positions share one formula; only the per-position log-probs differ (``rl.logprobs``).

Micro-batch accumulation: ``ppo_loss_terms`` returns *sums* (numerators) and their denominators, never means, so the
trainer can add the terms of several micro-batches and divide once (``finalize_metrics``), or, for the gradient, pass
the whole mini-batch's denominator as ``normalizer`` to every micro-batch's ``loss_fn``: the summed micro-batch
gradients then equal the gradient of one big batch exactly. (verl itself averages per-micro-batch means, ``loss /
gradient_accumulation``; pass ``normalizer = micro_denominator * n_micro`` to reproduce that instead.)

Shapes: B sequences, T positions (prompt + response); every per-position array is [B, T] and aligned with
``token_logprobs``: position t scores the step stored at t, and ``loss_mask[:, t]`` says whether it counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from softgrpo_jax.rl.logprobs import NOISES, discrete_positions, token_logprobs

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_TYPES = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Settings of the policy loss (defaults: the SofT-GRPO scripts, docs/algorithm.md, "Objective" and "Settings of the original runs"). Frozen, so hashable/static.

    clip_ratio_low / clip_ratio_high: PPO clip range ``[1 - low, 1 + high]``.
    clip_ratio_c: dual-clip bound for negative advantages (must be > 1); None disables dual clip.
    use_kl_loss / kl_coef / kl_type / kl_clamp: KL-to-reference term (verl ``kl_penalty``; k3 is clamped to
      ``+-kl_clamp``; its log-ratio is first clamped to +-20 as later verl does, which changes no value (past +-20
      the k3 term is already at the +-10 clamp) but keeps the gradient finite).
    loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum" (verl ``agg_loss``).
    entropy_coeff: must be 0 (SofT-GRPO uses none; no entropy term is implemented).
    log_ratio_clamp: clamp of ``logpi - logpi_old`` before ``exp`` (a guard against inf*0 = NaN gradients; verl 0.4
      has none). At +-20 it changes the loss by at most ``|A| e^-20`` and no gradient that is not already ~0.
      None disables.
    temperature / noise / discrete_from_ids / chunk_size: how ``loss_fn`` computes the current log-probs
      (``token_logprobs`` arguments).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_type: str = "low_var_kl"
    kl_clamp: float = 10.0
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    log_ratio_clamp: float | None = 20.0
    temperature: float = 1.0
    noise: str = "gumbel"
    discrete_from_ids: bool = False
    chunk_size: int | None = None

    def __post_init__(self):
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual clip) or None, got {self.clip_ratio_c}")
        if not (0.0 <= self.clip_ratio_low < 1.0) or self.clip_ratio_high < 0.0:
            raise ValueError(f"need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
                             f"{self.clip_ratio_low}, {self.clip_ratio_high}")
        if self.entropy_coeff != 0.0:
            raise ValueError("entropy_coeff must be 0: SofT-GRPO uses no entropy bonus and none is implemented")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size}")


# ---------------------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6, norm_by_std: bool = True) -> jax.Array:
    """GRPO outcome advantages (verl ``compute_grpo_outcome_advantage``): rewards [N] -> [N] float32.

    Consecutive blocks of ``group_size`` rows share a prompt. ``A = (r - mean_G) / (std_G + eps)`` with the unbiased
    (Bessel) std; ``norm_by_std=False`` gives ``r - mean_G`` (Dr. GRPO). A group of one gets mean 0 and std 1.
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1:
        raise ValueError(f"rewards must be [N], got shape {r.shape}")
    g = int(group_size)
    if g < 1 or r.shape[0] % g:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the number of rewards {r.shape[0]}")
    rg = r.reshape(-1, g)
    if g == 1:
        mean, std = jnp.zeros_like(rg), jnp.ones_like(rg)
    else:
        mean = rg.mean(axis=1, keepdims=True)
        std = jnp.sqrt(jnp.sum(jnp.square(rg - mean), axis=1, keepdims=True) / (g - 1))
    adv = (rg - mean) / (std + eps) if norm_by_std else rg - mean
    return adv.reshape(-1)


# ---------------------------------------------------------------------------------------------------- aggregation
def aggregation_weights(loss_mask: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """Per-token weights w [B, T] and a denominator d with ``agg(x) = sum(w * x) / d`` (verl ``agg_loss``).

    token-mean: w = mask, d = #tokens. seq-mean-token-mean: w = mask / #tokens of the row, d = #rows.
    seq-mean-token-sum: w = mask, d = #rows. "#rows" counts rows with at least one scored token, so all-padding
    rows a trainer adds to fill a micro-batch change nothing (verl counts every row; it never has empty ones).
    Both parts add up across micro-batches, which is what makes accumulation exact.
    """
    m = jnp.asarray(loss_mask).astype(jnp.float32)
    if mode == "token-mean":
        return m, m.sum()
    n = m.sum(axis=-1, keepdims=True)
    rows = (n > 0).astype(jnp.float32).sum()
    if mode == "seq-mean-token-mean":
        return m / jnp.maximum(n, 1.0), rows
    if mode == "seq-mean-token-sum":
        return m, rows
    raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")


def loss_denominator(loss_mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """The aggregation denominator of a (mini-)batch: pass it as ``normalizer`` to each micro-batch's ``loss_fn``."""
    return aggregation_weights(loss_mask, cfg.loss_agg_mode)[1]


# ---------------------------------------------------------------------------------------------------- loss
def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kl_type: str = "low_var_kl",
               clamp: float = 10.0) -> jax.Array:
    """Per-token KL estimate to the reference (verl ``kl_penalty``). k3: ``clip(e^d - d - 1, -clamp, clamp)``,
    ``d = clip(ref - logpi, -20, 20)``."""
    if kl_type in ("low_var_kl", "k3"):
        d = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
        return jnp.clip(jnp.exp(d) - d - 1.0, -clamp, clamp)
    if kl_type in ("kl", "k1"):
        return logprobs - ref_logprobs
    if kl_type == "abs":
        return jnp.abs(logprobs - ref_logprobs)
    if kl_type in ("mse", "k2"):
        return 0.5 * jnp.square(logprobs - ref_logprobs)
    raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


def ppo_loss_terms(logprobs: jax.Array, old_logprobs: jax.Array | None, ref_logprobs: jax.Array | None,
                   advantages: jax.Array, loss_mask: jax.Array, cfg: LossConfig,
                   on_policy: jax.Array | None = None) -> dict[str, jax.Array]:
    """verl's clipped policy loss + KL loss as additive sums (docs/algorithm.md, "Objective"). All inputs [B, T] (advantages [B] or [B, T]).

    ``old_logprobs`` None means on-policy (``stop_gradient(logprobs)``: ratio 1); so does ``on_policy`` ([B] bool)
    row by row, whatever ``old_logprobs`` holds there (one compiled program for on- and off-policy micro-batches).
    ``ref_logprobs`` None or ``cfg.use_kl_loss=False`` drops the KL. Old and reference log-probs never receive
    gradient.

    Returns scalars (add them over micro-batches, then ``finalize_metrics``):
      pg_sum, kl_sum       sum(w * L_pg), sum(w * kl) with the aggregation weights w
      denom                the aggregation denominator (``aggregation_weights``)
      tokens, rows         scored tokens, rows with a scored token
      ppo_kl_sum           sum over tokens of (old - logpi)                       (verl actor/ppo_kl)
      clipfrac_sum         tokens where the PPO clip bites (-A clip(r) > -A r)    (verl actor/pg_clipfrac)
      clipfrac_low_sum     ... with A < 0 and r < 1 - low;  clipfrac_high_sum: A > 0 and r > 1 + high
      clipfrac_dual_sum    tokens where dual clip bites (A < 0, max(..) > -A c)   (verl actor/pg_clipfrac_lower)
      ratio_sum, ratio_max_abs_log  sum of r; max |log r| over scored tokens (combine with max, not sum)
      kl_token_sum, logprob_sum     token sums of the KL term and of logpi
    """
    mask = jnp.asarray(loss_mask, bool)
    # unscored positions are replaced by 0 up front: garbage (inf/NaN) there reaches neither values nor gradients
    lp = jnp.where(mask, logprobs.astype(jnp.float32), 0.0)
    old = lp if old_logprobs is None else jnp.where(mask, old_logprobs.astype(jnp.float32), 0.0)
    if on_policy is not None:
        old = jnp.where(jnp.asarray(on_policy, bool)[:, None], lp, old)
    old = jax.lax.stop_gradient(old)
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, lp.shape)
    w, denom = aggregation_weights(mask, cfg.loss_agg_mode)
    mf = mask.astype(jnp.float32)

    log_ratio = lp - old
    if cfg.log_ratio_clamp is not None:
        log_ratio = jnp.clip(log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    lo, hi = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, lo, hi)
    lc = jnp.maximum(l1, l2)
    if cfg.clip_ratio_c is not None:
        l3 = -adv * cfg.clip_ratio_c
        pg = jnp.where(adv < 0, jnp.minimum(l3, lc), lc)
        dual = (lc > l3) & (adv < 0)
    else:
        pg = lc
        dual = jnp.zeros_like(mask)
    pg = jnp.where(mask, pg, 0.0)

    if cfg.use_kl_loss and ref_logprobs is not None:
        ref = jax.lax.stop_gradient(jnp.where(mask, ref_logprobs.astype(jnp.float32), 0.0))
        kl = jnp.where(mask, kl_penalty(lp, ref, cfg.kl_type, cfg.kl_clamp), 0.0)
    else:
        kl = jnp.zeros_like(lp)

    def tsum(x):
        return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0))

    return {
        "pg_sum": jnp.sum(w * pg),
        "kl_sum": jnp.sum(w * kl),
        "denom": denom,
        "tokens": mf.sum(),
        "rows": (mf.sum(-1) > 0).astype(jnp.float32).sum(),
        "ppo_kl_sum": tsum(-log_ratio),
        "clipfrac_sum": tsum(l2 > l1),
        "clipfrac_low_sum": tsum((adv < 0) & (ratio < lo)),
        "clipfrac_high_sum": tsum((adv > 0) & (ratio > hi)),
        "clipfrac_dual_sum": tsum(dual),
        "ratio_sum": tsum(ratio),
        "ratio_max_abs_log": jax.lax.stop_gradient(jnp.max(jnp.where(mask, jnp.abs(log_ratio), 0.0))),
        "kl_token_sum": tsum(kl),
        "logprob_sum": tsum(lp),
    }


def combine_loss(terms: Mapping[str, jax.Array], cfg: LossConfig, normalizer=None) -> jax.Array:
    """``(pg_sum + kl_coef * kl_sum) / normalizer`` (default: the terms' own ``denom``; an empty batch gives 0)."""
    den = terms["denom"] if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    num = terms["pg_sum"] + (cfg.kl_coef * terms["kl_sum"] if cfg.use_kl_loss else 0.0)
    return num / jnp.maximum(den, 1e-8)


def accumulate_terms(a: Mapping[str, jax.Array] | None, b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Add two term dicts (``max`` for ``*_max*`` keys); ``a=None`` starts an accumulation."""
    if a is None:
        return dict(b)
    return {k: (jnp.maximum(a[k], b[k]) if "_max" in k else a[k] + b[k]) for k in b}


def finalize_metrics(terms: Mapping[str, jax.Array], cfg: LossConfig) -> dict[str, jax.Array]:
    """Means from (accumulated) terms: pg_loss, kl_loss, loss (aggregated as ``cfg.loss_agg_mode``) and token means
    of ppo_kl, clip fractions, ratio, KL and log-prob."""
    den = jnp.maximum(terms["denom"], 1e-8)
    tok = jnp.maximum(terms["tokens"], 1e-8)
    out = {
        "pg_loss": terms["pg_sum"] / den,
        "kl_loss": terms["kl_sum"] / den,
        "loss": combine_loss(terms, cfg),
        "ratio_max_abs_log": terms["ratio_max_abs_log"],
        "tokens": terms["tokens"],
    }
    for k in ("ppo_kl", "clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_dual", "ratio", "kl_token", "logprob"):
        out[k if k != "ratio" else "ratio_mean"] = terms[k + "_sum"] / tok
    if "soft_tokens" in terms:
        out["soft_fraction"] = terms["soft_tokens"] / tok
    return out


def loss_fn(model, batch: Mapping[str, Any], old_logprobs: jax.Array | None, ref_logprobs: jax.Array | None,
            cfg: LossConfig = LossConfig(), normalizer=None, graphdef=None):
    """Loss of one (micro-)batch: ``(loss, terms)``, ready for ``nnx.value_and_grad(loss_fn, has_aux=True)``.

    Args:
      model: the policy ``Transformer``, or its ``nnx.State`` together with ``graphdef`` (``nnx.split``).
      batch: the ``token_logprobs`` keys plus ``loss_mask`` [B, T] bool, ``advantages`` [B] or [B, T] and ``tau``
        (scalar or [B]).
      old_logprobs, ref_logprobs: [B, T] from ``token_logprobs`` with the rollout-time / reference params (computed
        outside the gradient; they are stop-gradiented here too). None: on-policy ratio / no KL. An optional
        ``batch["on_policy"]`` [B] bool marks rows whose ratio is on-policy whatever ``old_logprobs`` holds.
      normalizer: denominator of the loss; None uses this batch's own (``loss_denominator``). For exact accumulation
        pass the mini-batch's ``loss_denominator`` to every micro-batch and sum the gradients.
    ``terms`` (see ``ppo_loss_terms``, plus ``soft_tokens``) add over micro-batches; ``finalize_metrics`` turns them
    into means.
    """
    if graphdef is not None:
        from flax import nnx

        model = nnx.merge(graphdef, model)
    for k in ("loss_mask", "advantages", "tau"):
        if k not in batch:
            raise KeyError(f"batch is missing {k!r}; loss_fn needs loss_mask [B,T], advantages [B] or [B,T], tau")
    lp = token_logprobs(model, batch, tau=batch["tau"], temperature=cfg.temperature, noise=cfg.noise,
                        chunk_size=cfg.chunk_size, discrete_from_ids=cfg.discrete_from_ids,
                        score_mask=batch["loss_mask"])
    mask = jnp.asarray(batch["loss_mask"], bool)
    terms = ppo_loss_terms(lp, old_logprobs, ref_logprobs, batch["advantages"], mask, cfg,
                           on_policy=batch.get("on_policy"))
    soft = ~discrete_positions(batch, discrete_from_ids=cfg.discrete_from_ids)
    terms["soft_tokens"] = jnp.sum(soft & mask).astype(jnp.float32)
    return combine_loss(terms, cfg, normalizer), terms
