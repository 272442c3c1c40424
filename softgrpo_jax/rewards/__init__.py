"""Answer checking: the training reward and the evaluation scorer, bounded in time.

Three checkers (``docs/algorithm.md``, sections "Reward" and "Evaluation"):

* ``mode="strict_string"`` reproduces the original training reward (verl ``math`` reward, Hendrycks MATH): take the
  last ``\\boxed{...}`` (or ``\\fbox{...}``) of the decoded response, normalise it and the gold answer with
  :func:`strip_string`, compare the strings.  Pure Python, linear in the input: it runs in the calling process.
* ``mode="math_verify"`` (the default reward): the content of the last box, parsed and compared with math-verify
  (``\\frac12`` == ``0.5``, ``2\\sqrt2`` == ``\\sqrt8``, ``10\\text{ cm}`` == ``10``...).
* :func:`eval_score_batch`: the evaluation scorer of the seed's ``matheval.py``: math-verify parses the *full*
  completion (thinking included) with ``LatexExtractionConfig(boxed="all", boxed_match_priority=0,
  try_extract_without_anchor=False, basic_latex, units)`` + ``ExprExtractionConfig()``, ``extraction_mode="first_match"``;
  the gold is parsed with ``ExprExtractionConfig`` (AIME, GSM8K) or ``LatexExtractionConfig`` (MATH-500, AMC).
  Faithful consequence: with ``boxed="all"`` a completion holding two different boxes parses as the *set* of both.

Time bound.  Every math-verify check runs in a :class:`ScoringPool` worker process; one past ``timeout_s`` has its
worker killed and replaced and scores 0.  Cheap pre-filters (answer length, brace depth, completion size) reject
absurd inputs before they cost a worker.  ``workers=0`` scores in the calling process with no time bound (trusted
inputs, debugging).

This module holds the batch API and re-exports the parts, one module per concern:
:mod:`~softgrpo_jax.rewards.normalize` (extraction, Hendrycks normalisation, the strict reward; pure Python),
:mod:`~softgrpo_jax.rewards.verify` (math-verify adapters, imported lazily, so this package imports without it),
:mod:`~softgrpo_jax.rewards.pool` (the worker pool and its timeouts) and :mod:`~softgrpo_jax.rewards.worker` (the
worker process, ``python -m softgrpo_jax.rewards --worker``, and its wire protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from softgrpo_jax.rewards.normalize import (
    MAX_ANSWER_CHARS,
    MAX_BRACE_DEPTH,
    brace_depth,
    extract_boxed_answer,
    extract_lenient_answer,
    is_equiv,
    last_boxed_only_string,
    remove_boxed,
    strict_string_reward,
    strip_string,
)
from softgrpo_jax.rewards.pool import DEFAULT_TIMEOUT_S, PoolStats, ScoringPool, default_workers, get_pool
from softgrpo_jax.rewards.verify import BENCHMARK_GOLD_FORMAT, GOLD_FORMATS, eval_correct, math_verify_answer_correct

__all__ = [
    "BENCHMARK_GOLD_FORMAT", "DEFAULT_TIMEOUT_S", "GOLD_FORMATS", "MAX_ANSWER_CHARS", "MAX_BRACE_DEPTH",
    "MAX_COMPLETION_CHARS", "MODES", "EvalScores", "PoolStats", "ScoringPool", "brace_depth", "default_workers",
    "eval_correct", "eval_score_batch", "extract_boxed_answer", "extract_lenient_answer", "get_pool", "is_equiv",
    "last_boxed_only_string", "math_reward", "math_verify_answer_correct", "remove_boxed", "score_batch",
    "score_rows", "strict_string_reward", "strip_string",
]

MODES = ("math_verify", "strict_string", "math_verify_lenient")
# pre-filter default: no real 32k-token completion is bigger
MAX_COMPLETION_CHARS = 400_000


def _answer_ok(answer: str | None, max_answer_chars: int, max_brace_depth: int) -> bool:
    return (answer is not None and answer.strip() != "" and len(answer) <= max_answer_chars
            and brace_depth(answer) <= max_brace_depth)


def score_batch(completions: Sequence[str], golds: Sequence[str], *, mode: str = "math_verify",
                workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, pool: ScoringPool | None = None,
                max_answer_chars: int = MAX_ANSWER_CHARS, max_brace_depth: int = MAX_BRACE_DEPTH) -> np.ndarray:
    """Rewards (float32 [N], each 1.0 or 0.0) for decoded responses against gold answers.

    ``mode="math_verify"``: the last box's content goes to a pool worker (``pool``, or the shared pool of ``workers``
    processes; ``workers=0``: in-process, unbounded) and is compared with math-verify; a check past ``timeout_s``
    scores 0.  Answers longer than ``max_answer_chars`` or nested deeper than ``max_brace_depth`` score 0 unchecked.
    ``mode="strict_string"``: the original's boxed-string reward, in-process (linear time, no pool).
    """
    return score_rows(completions, golds, mode=mode, workers=workers, timeout_s=timeout_s, pool=pool,
                      max_answer_chars=max_answer_chars, max_brace_depth=max_brace_depth)[0]


def score_rows(completions: Sequence[str], golds: Sequence[str], *, mode: str = "math_verify",
               workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, pool: ScoringPool | None = None,
               max_answer_chars: int = MAX_ANSWER_CHARS,
               max_brace_depth: int = MAX_BRACE_DEPTH) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_batch`'s rewards and, per response, whether its check did not finish (past ``timeout_s``, or
    the worker crashed): those score 0, and the caller counts them."""
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; choose one of {MODES}")
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    out = np.zeros(len(completions), np.float32)
    unverified = np.zeros(len(completions), bool)
    if mode == "strict_string":
        for i, (c, g) in enumerate(zip(completions, golds)):
            out[i] = strict_string_reward(c, str(g))
        return out, unverified
    todo, args = [], []
    extract = extract_lenient_answer if mode == "math_verify_lenient" else extract_boxed_answer
    for i, (c, g) in enumerate(zip(completions, golds)):
        ans = extract(c)
        if _answer_ok(ans, max_answer_chars, max_brace_depth):
            todo.append(i)
            args.append((ans, str(g)))
    if not todo:
        return out, unverified
    if workers == 0 and pool is None:
        vals = [math_verify_answer_correct(*a) for a in args]
    else:
        vals = (pool or get_pool(workers, timeout_s=timeout_s)).run("math_verify", args, timeout_s=timeout_s,
                                                                     default=None)
    unverified[todo] = [v is None for v in vals]
    out[todo] = np.asarray([0.0 if v is None else v for v in vals], np.float32)
    return out, unverified


def math_reward(completion: str, gold: str, *, mode: str = "math_verify", timeout_s: float = DEFAULT_TIMEOUT_S,
                workers: int | None = None, pool: ScoringPool | None = None) -> float:
    """1.0 if the final answer (last ``\\boxed{}``) of ``completion`` equals ``gold``, else 0.0 (see
    :func:`score_batch`; one item through the same bounded path)."""
    return float(score_batch([completion], [gold], mode=mode, timeout_s=timeout_s, workers=workers, pool=pool)[0])


@dataclass
class EvalScores:
    correct: np.ndarray  # bool [N]
    answers: list  # canonical answer string per completion (None: nothing extracted / timed out), for maj@k
    timeouts: int = 0
    unverified: np.ndarray | None = None  # bool [N]: the check did not finish (timed out, worker crashed): wrong


def eval_score_batch(completions: Sequence[str], golds: Sequence[str] | str, *, gold_format: str | Sequence[str] = "latex",
                     workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, pool: ScoringPool | None = None,
                     max_completion_chars: int = MAX_COMPLETION_CHARS) -> EvalScores:
    """The evaluation scoring of full completions, thinking included (``docs/algorithm.md``, section "Evaluation").
    ``gold_format`` is ``"expr"`` (AIME, GSM8K) or ``"latex"`` (MATH-500, AMC), one for all or one per item;
    :data:`BENCHMARK_GOLD_FORMAT` maps benchmark names.  Completions over ``max_completion_chars`` score 0
    unchecked; a check past ``timeout_s`` scores 0."""
    n = len(completions)
    golds = [golds] * n if isinstance(golds, str) else list(golds)
    fmts = [gold_format] * n if isinstance(gold_format, str) else list(gold_format)
    if len(golds) != n or len(fmts) != n:
        raise ValueError(f"{n} completions, {len(golds)} golds, {len(fmts)} gold formats")
    for f in set(fmts):
        if f not in GOLD_FORMATS:
            raise ValueError(f"unknown gold_format {f!r}; choose one of {GOLD_FORMATS}")
    correct = np.zeros(n, bool)
    answers: list = [None] * n
    todo = [i for i in range(n) if len(completions[i]) <= max_completion_chars]
    args = [(completions[i], str(golds[i]), fmts[i]) for i in todo]
    timeouts = 0
    unverified = np.zeros(n, bool)
    if args:
        if workers == 0 and pool is None:
            vals = [eval_correct(*a) for a in args]
        else:
            p = pool or get_pool(workers, timeout_s=timeout_s)
            before = p.stats.timeouts
            vals = p.run("eval", args, timeout_s=timeout_s, default=None)
            timeouts = p.stats.timeouts - before
        for i, v in zip(todo, vals):
            ok, key = (False, None) if v is None else v
            correct[i], answers[i], unverified[i] = bool(ok), key, v is None
    return EvalScores(correct, answers, timeouts, unverified)
