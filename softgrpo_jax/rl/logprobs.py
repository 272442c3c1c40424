"""Per-position log-probabilities for SofT-GRPO training (SPEC.md 2 and 7).

Shapes: B batch, T sequence (prompt + response), K top-K slots, V vocab, D width.

A soft step stores K token ids and the perturbed log-probs ``ytil`` of the rollout (``log(p_hat + 1e-6) + g``).
Its "log-prob" under the current policy is the Gumbel(0, 1) log-density of the noise it implies,
``z = ytil - log(q + 1e-6)`` with q the policy's probabilities renormalised over the K ids (``gumbel_logprob``).
A discrete step (prompt, answer, ``</think>``) uses the ordinary ``log_softmax`` (``discrete_logprob``).
``token_logprobs`` rebuilds the rollout's soft inputs, runs the model and evaluates both at every position.

All arithmetic here is float32, whatever dtype the logits arrive in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.soft_embed import soft_embed_fused

# SPEC.md 2.2 constants of the original code (VERL/utils/torch_functional.py).
GUMBEL_Z_MIN = -1.5
GUMBEL_Z_MAX = 3.0
GUMBEL_LAMBDA_MIN = -3.0
Q_EPS = 1e-6

NOISES = ("gumbel", "gaussian", "dirichlet")
BATCH_KEYS = ("tokens", "attention_mask", "topk_ids", "topk_ytil")


def _gather(logits: jax.Array, topk_ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits.astype(jnp.float32), topk_ids.astype(jnp.int32), axis=-1)


def _log_q(topk_logits: jax.Array) -> jax.Array:
    """log q_k: the policy renormalised over the K stored ids, [..., K] float32, from the K ids' logits.

    ``P[a_k] / sum_j P[a_j]`` with ``P = softmax(logits)`` equals ``softmax(logits[a])`` over the K gathered logits
    (the full-vocabulary normaliser cancels), which is how it is computed: no V-wide softmax (``token_logprobs``
    never forms the other V - K logits of a soft step), and no 0/0 when every ``P[a_k]`` underflows. Duplicate ids
    count once per slot, as in the original.
    """
    return jax.nn.log_softmax(topk_logits.astype(jnp.float32), axis=-1)


def _masked_slot_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over slots where ``mask``; a row with no valid slot falls back to the mean over all slots."""
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    m = jnp.where(any_valid, mask, True)
    safe = jnp.where(m, values, 0.0)  # where, not multiply: a NaN/inf in an excluded slot must not leak
    return safe.sum(-1) / m.sum(-1).astype(jnp.float32)


def gumbel_logprob(logits: jax.Array, topk_ids: jax.Array, topk_ytil: jax.Array) -> jax.Array:
    """Gumbel-reparameterised log-probability of a soft step (SPEC.md 2.2).

    Args:
      logits: [..., V] the policy's (temperature-scaled) logits at the step.
      topk_ids: [..., K] int the K token ids stored by the rollout.
      topk_ytil: [..., K] the stored perturbed log-probs ``ytil = log(p_hat + 1e-6) + g``.
    Returns:
      [...] float32: ``mean_{k: lam_k > -3} phi(z_k)`` with ``q = renormalised P over the K ids``,
      ``lam = log(q + 1e-6)``, ``z = clip(ytil - lam, -1.5, 3)``, ``phi(z) = -z - exp(-z)`` (standard Gumbel
      log-pdf). The slot mask comes from the current policy's ``lam`` (no gradient through it); the clip zeroes the
      gradient of clamped slots; ``d phi / d lam = 1 - exp(-z)`` elsewhere. If no slot has ``lam > -3`` (only
      possible with K > 20) the mean runs over all K slots instead of dividing by zero.
    """
    return _gumbel_from_topk(_gather(logits, topk_ids), topk_ytil)


def _gumbel_from_topk(topk_logits, topk_ytil):
    q = jnp.exp(_log_q(topk_logits))
    lam = jnp.log(q + Q_EPS)
    z = jnp.clip(topk_ytil.astype(jnp.float32) - lam, GUMBEL_Z_MIN, GUMBEL_Z_MAX)
    phi = -z - jnp.exp(-z)
    return _masked_slot_mean(phi, lam > GUMBEL_LAMBDA_MIN)


def gaussian_logprob(logits: jax.Array, topk_ids: jax.Array, topk_s: jax.Array, *, std: float = 0.05,
                     clamp: float = 0.15, threshold: float = 0.05) -> jax.Array:
    """Gaussian-noise ablation (SPEC.md 2.3): ``mean_{q_k > 0.05} log N(clip(s_k, q_k - 0.15, q_k + 0.15); q_k, 0.05)``.

    ``topk_s`` [..., K] holds the rollout's noisy probabilities ``s ~ N(p_hat, std^2)``; q as in ``gumbel_logprob``
    (without the 1e-6). Returns [...] float32.
    """
    return _gaussian_from_topk(_gather(logits, topk_ids), topk_s, std=std, clamp=clamp, threshold=threshold)


def _gaussian_from_topk(topk_logits, topk_s, *, std=0.05, clamp=0.15, threshold=0.05):
    q = jnp.exp(_log_q(topk_logits))
    x = jnp.clip(topk_s.astype(jnp.float32), q - clamp, q + clamp)
    logpdf = -0.5 * jnp.square((x - q) / std) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return _masked_slot_mean(logpdf, q > threshold)


def dirichlet_logprob(logits: jax.Array, topk_ids: jax.Array, topk_s: jax.Array, *, alpha: float = 1.0,
                      threshold: float = 0.05, clamp: tuple[float, float] = (-5.0, 3.0)) -> jax.Array:
    """Dirichlet-noise ablation (SPEC.md 2.3): ``mean_{q_k > 0.05} clip(log Gamma(s_k; alpha q_k, rate 1), -5, 3)``.

    ``topk_s`` [..., K] holds the rollout's Gamma draws. ``log Gamma(s; c, 1) = (c - 1) log s - s - lgamma(c)``.
    Slots outside the mask are evaluated at safe values (q = 1, s = 1) so that q = 0 or s <= 0 there cannot
    produce a NaN value or gradient. Returns [...] float32.
    """
    return _dirichlet_from_topk(_gather(logits, topk_ids), topk_s, alpha=alpha, threshold=threshold, clamp=clamp)


def _dirichlet_from_topk(topk_logits, topk_s, *, alpha=1.0, threshold=0.05, clamp=(-5.0, 3.0)):
    q = jnp.exp(_log_q(topk_logits))
    valid = q > threshold
    s = topk_s.astype(jnp.float32)
    ok = valid & (s > 0)
    c = alpha * jnp.where(ok, q, 1.0)
    s_safe = jnp.where(ok, s, 1.0)
    logpdf = (c - 1.0) * jnp.log(s_safe) - s_safe - jax.scipy.special.gammaln(c)
    logpdf = jnp.where(valid & ~ok, -jnp.inf, logpdf)  # a valid slot with s <= 0 has density 0
    return _masked_slot_mean(jnp.clip(logpdf, clamp[0], clamp[1]), valid)


def discrete_logprob(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """``log_softmax(logits)[ids]`` over the full vocabulary: logits [..., V], ids [...] -> [...] float32."""
    lf = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(lf, ids.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(lf, axis=-1)


# the soft densities from the K stored ids' logits [..., K] (what token_logprobs computes instead of [..., V])
_SOFT_FNS = {"gumbel": _gumbel_from_topk, "gaussian": _gaussian_from_topk, "dirichlet": _dirichlet_from_topk}


def discrete_positions(batch: Mapping[str, Any], *, discrete_from_ids: bool = False) -> jax.Array:
    """[B, T] bool: positions whose stored step is discrete (one-hot input, log_softmax target).

    Default: ``~soft_mask`` (the rollout's explicit mask). ``discrete_from_ids=True`` reproduces the original's test
    ``all(topk_ids[..., 1:] == 0)`` (which also calls a soft step discrete when its slots 1..K-1 all hold id 0).
    """
    if discrete_from_ids:
        return jnp.all(batch["topk_ids"][..., 1:] == 0, axis=-1)
    if "soft_mask" not in batch:
        raise KeyError("batch has no 'soft_mask': pass it, or call with discrete_from_ids=True to use the "
                       "original all(topk_ids[..., 1:] == 0) test")
    return ~jnp.asarray(batch["soft_mask"], bool)


def _check_batch(batch: Mapping[str, Any], noise: str):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; token_logprobs needs {list(BATCH_KEYS)} "
                       "(+ 'soft_mask' unless discrete_from_ids=True)")
    if noise not in _SOFT_FNS:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    B, T = batch["tokens"].shape
    K = batch["topk_ids"].shape[-1]
    for k, shape in (("attention_mask", (B, T)), ("topk_ids", (B, T, K)), ("topk_ytil", (B, T, K))):
        if tuple(batch[k].shape) != shape:
            raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {shape} "
                             f"(tokens is {(B, T)}, K = {K})")


def _tau_for(tau, B: int):
    """A scalar tau, or a per-row [B] tau reshaped to [B, 1] (broadcasts over T inside soft_weights)."""
    t = jnp.asarray(tau, jnp.float32)
    if t.ndim == 0:
        return t
    if t.shape == (B,):
        return t[:, None]
    raise ValueError(f"tau must be a scalar or shape [B]={B}, got shape {t.shape}")


def rebuild_inputs(table: jax.Array, batch: Mapping[str, Any], *, tau, discrete_from_ids: bool = False) -> jax.Array:
    """The rollout's input embeddings [B, T, D] from stored ids and ytil (SPEC.md 2.1), under stop_gradient.

    ``w = softmax(ytil / tau)`` with slots 1..K-1 masked at discrete positions (one-hot on slot 0),
    ``e = sum w E[ids]``.
    No gradient reaches the table, the weights or anything upstream through this path.
    """
    ids = batch["topk_ids"]
    disc = discrete_positions(batch, discrete_from_ids=discrete_from_ids)
    emb = soft_embed_fused(jax.lax.stop_gradient(table), ids, jax.lax.stop_gradient(batch["topk_ytil"]),
                           _tau_for(tau, ids.shape[0]), disc)
    return jax.lax.stop_gradient(emb)


def token_logprobs(model, batch: Mapping[str, Any], *, tau, temperature: float = 1.0, noise: str = "gumbel",
                   chunk_size: int | None = None, discrete_from_ids: bool = False,
                   score_mask: jax.Array | None = None) -> jax.Array:
    """Per-position log-probs of the stored targets under ``model`` (SPEC.md 2.1, 2.2, 7).

    Args:
      model: a ``Transformer`` (anything with ``embedding_table()``, ``__call__(inputs_embeds=..., attention_mask=...,
        return_hidden=True)``, ``logits_at_ids`` and ``vocab_logprobs``).
      batch: ``tokens`` [B, T] int32, ``attention_mask`` [B, T] bool, ``topk_ids`` [B, T, K] int32,
        ``topk_ytil`` [B, T, K] float32, ``soft_mask`` [B, T] bool (not needed with ``discrete_from_ids``).
        Prompts left-padded, responses right-padded (real tokens contiguous).
      tau: Gumbel-softmax temperature used to rebuild the inputs: scalar or [B].
      temperature: logits are divided by it before any log-prob (``T_train``).
      noise: "gumbel" (SofT-GRPO), "gaussian" or "dirichlet" (ablations) for soft targets.
      chunk_size: rows (positions of the whole batch) per chunk of vocabulary-wide logits: only [chunk_size, V]
        float32 logits are live at once. None: ~128 MB of them (``models.transformer.vocab_chunk_rows``; on
        single-device XLA:CPU 1024 rows whose logits are formed in blocks of vocabulary columns, ``VOCAB_BLOCK``).
      discrete_from_ids: use the original's ``all(ids[1:] == 0)`` discrete test instead of ``soft_mask``.
      score_mask: [B, T] bool, the positions the caller will use (the loss mask); the others return 0 and cost
        nothing. None: every valid position.
    Returns:
      [B, T] float32, aligned with the targets: ``out[:, t]`` is the log-prob of the step stored at position t
      (``tokens[:, t]`` / ``topk_ids[:, t]``, ``topk_ytil[:, t]``), computed from the logits at position t - 1.
      ``out[:, 0]`` is 0, and so is every t where position t or t - 1 is padding or ``score_mask`` is False.
    Discrete targets (``discrete[t]``) score ``log_softmax(logits_{t-1})[tokens[t]]``; soft targets the noise density,
    which needs only the logits of the K stored ids: those come from ``logits_at_ids`` (K dot products per
    position), and the vocabulary-wide logits are formed only at the scored discrete targets (``vocab_logprobs``).
    The values are those of the full logits (``gumbel_logprob`` / ``discrete_logprob`` of ``logits_from_hidden``),
    up to float32 summation order.
    Inputs are rebuilt by ``rebuild_inputs`` under ``stop_gradient``: gradients never flow through input embeddings.
    """
    _check_batch(batch, noise)
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], bool)
    B, T = tokens.shape
    disc = discrete_positions(batch, discrete_from_ids=discrete_from_ids)

    emb = rebuild_inputs(model.embedding_table(), batch, tau=tau, discrete_from_ids=discrete_from_ids)
    hidden = model(inputs_embeds=emb, attention_mask=mask, return_hidden=True)  # [B, T, D]

    # position t-1 predicts the step stored at t
    h = hidden[:, :-1]
    valid = mask[:, 1:] & mask[:, :-1]
    if score_mask is not None:
        valid = valid & jnp.asarray(score_mask, bool)[:, 1:]
    tgt_disc = disc[:, 1:]
    temp = jnp.asarray(temperature, jnp.float32)
    la = model.logits_at_ids(h, batch["topk_ids"][:, 1:]) / temp  # [B, T-1, K]
    soft = _SOFT_FNS[noise](la, batch["topk_ytil"][:, 1:])
    full = model.vocab_logprobs(h, tokens[:, 1:], valid & tgt_disc, temperature=temperature, chunk_size=chunk_size)
    lp = jnp.where(valid, jnp.where(tgt_disc, full, soft), 0.0)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp.astype(jnp.float32)], axis=1)
