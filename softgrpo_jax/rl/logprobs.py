"""Per-position log-probabilities for SofT-GRPO training (docs/algorithm.md, "Training inputs" and "Log-density of a soft step").

Shapes: B batch, T sequence (prompt + response), K top-K slots, V vocab, D width.

A soft step stores K token ids and the perturbed log-probs ``ytil`` of the rollout (``log(p_hat + 1e-6) + g``).
Its "log-prob" under the current policy is the Gumbel(0, 1) log-density of the noise it implies,
``z = ytil - log(q + 1e-6)`` with q the policy's probabilities renormalised over the K ids (``gumbel_logprob``;
over the slots top-p kept, and with no gradient through slots whose noise was clamped, where the rollout recorded
them: ``Rollout.topk_kept`` / ``topk_clamped``).
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

# constants of the original code (docs/algorithm.md, "Log-density of a soft step") (VERL/utils/torch_functional.py).
GUMBEL_Z_MIN = -1.5
GUMBEL_Z_MAX = 3.0
GUMBEL_LAMBDA_MIN = -3.0
Q_EPS = 1e-6

NOISES = ("gumbel", "gaussian", "dirichlet")
BATCH_KEYS = ("tokens", "attention_mask", "topk_ids", "topk_ytil")
SLOT_KEYS = ("topk_kept", "topk_clamped")  # optional [B, T, K] bool (Rollout.topk_kept / topk_clamped)


def _gather(logits: jax.Array, topk_ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits.astype(jnp.float32), topk_ids.astype(jnp.int32), axis=-1)


def _kept_slots(kept: jax.Array | None) -> jax.Array | None:
    """The slots that count, [..., K] bool: ``kept``, or every slot at a position with none kept (padding, prompt
    rows built without it), so that no position divides by zero."""
    if kept is None:
        return None
    kept = jnp.asarray(kept, bool)
    return kept | ~jnp.any(kept, axis=-1, keepdims=True)


def _log_q(topk_logits: jax.Array, kept: jax.Array | None = None) -> jax.Array:
    """log q_k: the policy renormalised over the K stored ids, [..., K] float32, from the K ids' logits.

    ``P[a_k] / sum_j P[a_j]`` with ``P = softmax(logits)`` equals ``softmax(logits[a])`` over the K gathered logits
    (the full-vocabulary normaliser cancels), which is how it is computed: no V-wide softmax (``token_logprobs``
    never forms the other V - K logits of a soft step), and no 0/0 when every ``P[a_k]`` underflows. Duplicate ids
    count once per slot, as in the original. With ``kept`` (from ``_kept_slots``) the sum runs over the kept slots
    only and the others get ``log q = -inf`` (q = 0): the rollout gave them probability 0.
    """
    la = topk_logits.astype(jnp.float32)
    if kept is not None:
        la = jnp.where(kept, la, -jnp.inf)
    return jax.nn.log_softmax(la, axis=-1)


def _masked_slot_mean(values: jax.Array, mask: jax.Array, universe: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` over slots where ``mask``; a row with no valid slot falls back to the mean over the
    ``universe`` slots (default: all)."""
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    m = jnp.where(any_valid, mask, True if universe is None else universe)
    safe = jnp.where(m, values, 0.0)  # where, not multiply: a NaN/inf in an excluded slot must not leak
    return safe.sum(-1) / m.sum(-1).astype(jnp.float32)


def gumbel_logprob(logits: jax.Array, topk_ids: jax.Array, topk_ytil: jax.Array, kept: jax.Array | None = None,
                   clamped: jax.Array | None = None) -> jax.Array:
    """Gumbel-reparameterised log-probability of a soft step (docs/algorithm.md, "Log-density of a soft step").

    Args:
      logits: [..., V] the policy's (temperature-scaled) logits at the step.
      topk_ids: [..., K] int the K token ids stored by the rollout.
      topk_ytil: [..., K] the stored perturbed log-probs ``ytil = log(p_hat + 1e-6) + g``.
      kept: optional [..., K] bool, the slots whose token the rollout's filters kept (``Rollout.topk_kept``). The
        others (top-p / top-k cut them; the rollout gave them probability 0) take no part: q is renormalised over
        the kept slots and only kept slots are averaged, as in the original, whose cut slots hold near-zero
        probability ids. None: every slot is kept.
      clamped: optional [..., K] bool, the slots whose rollout noise lies on or beyond the clip
        (``Rollout.topk_clamped``). Their ``phi(z)`` counts as usual but passes no gradient, whatever the
        rounding of ``z`` at the clip boundary. None: the clip's own gradient decides.
    Returns:
      [...] float32: ``mean_{k: kept_k, lam_k > -3} phi(z_k)`` with ``q = renormalised P over the kept ids``,
      ``lam = log(q + 1e-6)``, ``z = clip(ytil - lam, -1.5, 3)``, ``phi(z) = -z - exp(-z)`` (standard Gumbel
      log-pdf). The slot mask comes from the current policy's ``lam`` (no gradient through it); the clip zeroes the
      gradient of clamped slots; ``d phi / d lam = 1 - exp(-z)`` elsewhere. If no kept slot has ``lam > -3`` (only
      possible with K > 20) the mean runs over the kept slots instead of dividing by zero.
    """
    return _gumbel_from_topk(_gather(logits, topk_ids), topk_ytil, kept=kept, clamped=clamped)


def gumbel_noise(topk_logits: jax.Array, topk_ytil: jax.Array, kept: jax.Array | None = None) -> tuple[
        jax.Array, jax.Array]:
    """The noise a soft step implies under a policy, before the clip: ``(ytil - lam, lam)``, each [..., K] float32,
    with ``lam = log(q + 1e-6)`` and q the policy over the (kept) slots, from the K ids' logits [..., K]. At the
    rollout policy ``ytil - lam`` is the noise the rollout drew, ``noise_factor * g``, for every kept slot."""
    kept = _kept_slots(kept)
    lam = jnp.log(jnp.exp(_log_q(topk_logits, kept)) + Q_EPS)
    return topk_ytil.astype(jnp.float32) - lam, lam


def _gumbel_from_topk(topk_logits, topk_ytil, kept=None, clamped=None):
    kept = _kept_slots(kept)
    zr, lam = gumbel_noise(topk_logits, topk_ytil, kept)
    z = jnp.clip(zr, GUMBEL_Z_MIN, GUMBEL_Z_MAX)
    if clamped is not None:
        # z of a clamped slot sits on the clip boundary at the rollout policy, where rounding would pick its
        # gradient (0 outside, 1 - e^-z inside): fix it at 0, as when rounding lands outside
        z = jnp.where(jnp.asarray(clamped, bool), jax.lax.stop_gradient(z), z)
    phi = -z - jnp.exp(-z)
    valid = lam > GUMBEL_LAMBDA_MIN
    if kept is not None:
        valid = valid & kept
    return _masked_slot_mean(phi, valid, kept)


def gaussian_logprob(logits: jax.Array, topk_ids: jax.Array, topk_s: jax.Array, kept: jax.Array | None = None, *,
                     std: float = 0.05, clamp: float = 0.15, threshold: float = 0.05) -> jax.Array:
    """Gaussian-noise ablation (docs/algorithm.md, "Log-density of a soft step"): ``mean_{q_k > 0.05} log N(clip(s_k, q_k - 0.15, q_k + 0.15); q_k, 0.05)``.

    ``topk_s`` [..., K] holds the rollout's noisy probabilities ``s ~ N(p_hat, std^2)``; q and ``kept`` as in
    ``gumbel_logprob`` (without the 1e-6). Returns [...] float32.
    """
    return _gaussian_from_topk(_gather(logits, topk_ids), topk_s, kept=kept, std=std, clamp=clamp,
                               threshold=threshold)


def _gaussian_from_topk(topk_logits, topk_s, kept=None, *, std=0.05, clamp=0.15, threshold=0.05):
    kept = _kept_slots(kept)
    q = jnp.exp(_log_q(topk_logits, kept))
    x = jnp.clip(topk_s.astype(jnp.float32), q - clamp, q + clamp)
    logpdf = -0.5 * jnp.square((x - q) / std) - math.log(std) - 0.5 * math.log(2 * math.pi)
    valid = q > threshold
    return _masked_slot_mean(logpdf, valid if kept is None else valid & kept, kept)


def dirichlet_logprob(logits: jax.Array, topk_ids: jax.Array, topk_s: jax.Array, kept: jax.Array | None = None, *,
                      alpha: float = 1.0, threshold: float = 0.05,
                      clamp: tuple[float, float] = (-5.0, 3.0)) -> jax.Array:
    """Dirichlet-noise ablation (docs/algorithm.md, "Log-density of a soft step"): ``mean_{q_k > 0.05} clip(log Gamma(s_k; alpha q_k, rate 1), -5, 3)``.

    ``topk_s`` [..., K] holds the rollout's Gamma draws; q and ``kept`` as in ``gumbel_logprob``.
    ``log Gamma(s; c, 1) = (c - 1) log s - s - lgamma(c)``. Slots outside the mask are evaluated at safe values
    (q = 1, s = 1) so that q = 0 or s <= 0 there cannot produce a NaN value or gradient. Returns [...] float32.
    """
    return _dirichlet_from_topk(_gather(logits, topk_ids), topk_s, kept=kept, alpha=alpha, threshold=threshold,
                                clamp=clamp)


def _dirichlet_from_topk(topk_logits, topk_s, kept=None, *, alpha=1.0, threshold=0.05, clamp=(-5.0, 3.0)):
    kept = _kept_slots(kept)
    q = jnp.exp(_log_q(topk_logits, kept))
    valid = q > threshold if kept is None else (q > threshold) & kept
    s = topk_s.astype(jnp.float32)
    ok = valid & (s > 0)
    c = alpha * jnp.where(ok, q, 1.0)
    s_safe = jnp.where(ok, s, 1.0)
    logpdf = (c - 1.0) * jnp.log(s_safe) - s_safe - jax.scipy.special.gammaln(c)
    logpdf = jnp.where(valid & ~ok, -jnp.inf, logpdf)  # a valid slot with s <= 0 has density 0
    return _masked_slot_mean(jnp.clip(logpdf, clamp[0], clamp[1]), valid, kept)


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
    for k, shape in (("attention_mask", (B, T)), ("topk_ids", (B, T, K)), ("topk_ytil", (B, T, K)),
                     *((k, (B, T, K)) for k in SLOT_KEYS if batch.get(k) is not None)):
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
    """The rollout's input embeddings [B, T, D] from stored ids and ytil (docs/algorithm.md, "Training inputs"), under stop_gradient.

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
    """Per-position log-probs of the stored targets under ``model`` (docs/algorithm.md, "Training inputs", "Log-density of a soft step").

    Args:
      model: a ``Transformer`` (anything with ``embedding_table()``, ``__call__(inputs_embeds=..., attention_mask=...,
        return_hidden=True)``, ``logits_at_ids`` and ``vocab_logprobs``).
      batch: ``tokens`` [B, T] int32, ``attention_mask`` [B, T] bool, ``topk_ids`` [B, T, K] int32,
        ``topk_ytil`` [B, T, K] float32, ``soft_mask`` [B, T] bool (not needed with ``discrete_from_ids``).
        Prompts left-padded, responses right-padded (real tokens contiguous). Optional ``topk_kept`` and
        ``topk_clamped`` [B, T, K] bool (``gumbel_logprob``'s ``kept`` / ``clamped``; clamped is Gumbel-only):
        the slots top-p kept, and the slots whose noise was clamped; absent, every slot counts and the clip's own
        gradient decides.
      tau: Gumbel-softmax temperature used to rebuild the inputs: scalar or [B].
      temperature: logits are divided by it before any log-prob (``T_train``).
      noise: "gumbel" (SofT-GRPO), "gaussian" or "dirichlet" (ablations) for soft targets.
      chunk_size: rows (positions of the whole batch) per chunk of vocabulary-wide logits: only [chunk_size, V]
        float32 logits are live at once. None: ~128 MB of them (``ops.vocab_logprobs.vocab_chunk_rows``; on
        single-device XLA:CPU 1024 rows whose logits are formed in blocks of vocabulary columns, ``VOCAB_BLOCK``).
      discrete_from_ids: use the original's ``all(ids[1:] == 0)`` discrete test instead of ``soft_mask``.
      score_mask: [B, T] bool, the positions the caller will use (the loss mask); the others return 0 and cost
        nothing. None: every valid position.
    Returns:
      [B, T] float32, aligned with the targets: ``out[:, t]`` is the log-prob of the step stored at position t
      (``tokens[:, t]`` / ``topk_ids[:, t]``, ``topk_ytil[:, t]``), computed from the logits at position t - 1.
      ``out[:, 0]`` is 0, and so is every t where position t or t - 1 is padding or ``score_mask`` is False.
    Shared prompts (``batch["prefix_idx"]`` present, ``rl.batching.gather_prefix_micro_batches``): the rows hold
    responses only, ``prompt_tokens`` / ``prompt_mask`` [U, P] the prompts they continue, each run once for all
    its rows (``forward``'s ``return_kv`` / ``prefix``); ``out[:, 0]`` then scores the response's first step,
    predicted by its prompt's last token. The values are those of the rows with their prompts in front.
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
    # ytil counts only at real soft steps; whatever stands elsewhere (padding, leftovers at discrete steps, even a
    # NaN) must reach neither the inputs nor, through a masked-out branch, the gradient
    batch = {**batch, "topk_ytil": jnp.where((mask & ~disc)[..., None], batch["topk_ytil"], 0.0)}

    emb = rebuild_inputs(model.embedding_table(), batch, tau=tau, discrete_from_ids=discrete_from_ids)
    if "prefix_idx" in batch:  # shared prompts: the rows hold responses only (see the docstring)
        h, valid = _prefixed_hidden(model, batch, emb, mask)
        sl = slice(None)
    else:
        hidden = model(inputs_embeds=emb, attention_mask=mask, return_hidden=True)  # [B, T, D]
        # position t-1 predicts the step stored at t
        h = hidden[:, :-1]
        valid = mask[:, 1:] & mask[:, :-1]
        sl = slice(1, None)
    if score_mask is not None:
        valid = valid & jnp.asarray(score_mask, bool)[:, sl]
    tgt_disc = disc[:, sl]
    temp = jnp.asarray(temperature, jnp.float32)
    la = model.logits_at_ids(h, batch["topk_ids"][:, sl]) / temp  # [B, T-1, K]
    slots = {}
    if batch.get("topk_kept") is not None:
        slots["kept"] = jnp.asarray(batch["topk_kept"], bool)[:, sl]
    if noise == "gumbel" and batch.get("topk_clamped") is not None:
        slots["clamped"] = jnp.asarray(batch["topk_clamped"], bool)[:, sl]
    soft = _SOFT_FNS[noise](la, batch["topk_ytil"][:, sl], **slots)
    full = model.vocab_logprobs(h, tokens[:, sl], valid & tgt_disc, temperature=temperature, chunk_size=chunk_size)
    lp = jnp.where(valid, jnp.where(tgt_disc, full, soft), 0.0).astype(jnp.float32)
    if "prefix_idx" in batch:
        return lp
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp], axis=1)


def _prefixed_hidden(model, batch: Mapping[str, Any], emb: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shared prompts: the prompts ``prompt_tokens`` [U, P] (real tokens first, ``prompt_mask``) run once, and each
    response row [R, T] continues prompt ``prefix_idx`` [R] over its keys and values. Returns the hidden states
    that predict each response position, [R, T, D] (position 0 from its prompt's last token), and the positions
    that have a real token and a real predecessor, [R, T]."""
    pt = jnp.asarray(batch["prompt_tokens"], jnp.int32)
    pm = jnp.asarray(batch["prompt_mask"], bool)
    idx = jnp.asarray(batch["prefix_idx"], jnp.int32)
    pe = jax.lax.stop_gradient(jnp.take(model.embedding_table(), pt, axis=0))  # as rebuild_inputs: no gradient
    hp, (k, v) = model(inputs_embeds=pe, attention_mask=pm, return_hidden=True, return_kv=True)
    take = (lambda a: [x[idx] for x in a]) if isinstance(k, list) else (lambda a: jnp.take(a, idx, axis=1))
    plen = pm.sum(axis=1).astype(jnp.int32)
    positions = plen[idx][:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hr = model(inputs_embeds=emb, attention_mask=mask, positions=positions, prefix=(take(k), take(v), pm[idx]),
               return_hidden=True)
    last = jnp.take_along_axis(hp, jnp.maximum(plen - 1, 0)[:, None, None], axis=1)  # [U, 1, D]
    h = jnp.concatenate([last[idx].astype(hr.dtype), hr[:, :-1]], axis=1)
    valid = mask & jnp.concatenate([(plen[idx] > 0)[:, None], mask[:, :-1]], axis=1)
    return h, valid
