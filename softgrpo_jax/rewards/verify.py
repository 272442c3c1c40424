"""math-verify adapters: parse and compare answers symbolically, with no time bound of their own.

math-verify (and sympy behind it) is imported lazily, on the first check, so the package imports on machines without
it; only pool workers and ``workers=0`` scoring ever call in here.  math-verify's own timeouts use ``signal.alarm``
(main thread only), so every call passes ``parsing_timeout=None`` / ``timeout_seconds=None``: the time bound is the
worker pool's (:mod:`softgrpo_jax.rewards.pool`).  The gold formats and the evaluation judge follow the seed's
``matheval.py`` (``docs/algorithm.md``, section "Evaluation").
"""

from __future__ import annotations

import functools
import logging

from softgrpo_jax.rewards.normalize import MAX_ANSWER_CHARS

GOLD_FORMATS = ("latex", "expr")
# gold parsing of the seed's matheval.py, per benchmark (AIMEEvaluator / GSM8KEvaluator: Expr; MATH500 / AMC: Latex)
BENCHMARK_GOLD_FORMAT = {"aime24": "expr", "aime25": "expr", "aime2024": "expr", "aime2025": "expr", "gsm8k": "expr",
                         "math500": "latex", "amc23": "latex", "olympiad_bench": "latex"}


@functools.cache
def _mv():
    import math_verify
    from latex2sympy2_extended import NormalizationConfig

    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the "Timeout is disabled" warning on every call
    eval_pred_config = [
        math_verify.LatexExtractionConfig(
            normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                     boxed="all", units=True),
            boxed_match_priority=0, try_extract_without_anchor=False),
        math_verify.ExprExtractionConfig(),
    ]
    return math_verify, eval_pred_config


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, fmt: str):
    """Gold parsing.  ``expr``: as the seed's AIME/GSM8K evaluators; ``latex``: ``$gold$`` with LatexExtractionConfig
    as its MATH500/AMC evaluators; ``auto``: latex, then expr (the training reward's gold)."""
    mv, _ = _mv()
    if fmt == "expr":
        return mv.parse(gold, extraction_config=[mv.ExprExtractionConfig()], parsing_timeout=None)
    wrapped = gold if gold.startswith("$") else f"${gold}$"
    parsed = mv.parse(wrapped, extraction_config=[mv.LatexExtractionConfig()], parsing_timeout=None)
    if not parsed and fmt == "auto":
        parsed = mv.parse(gold, extraction_config=[mv.ExprExtractionConfig()], parsing_timeout=None)
    return parsed


def _verify(gold_parsed, pred_parsed) -> bool:
    mv, _ = _mv()
    return bool(gold_parsed) and bool(pred_parsed) and bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def math_verify_answer_correct(answer: str, gold: str) -> float:
    """Unbounded: ``answer`` (a box's content) against ``gold`` with math-verify.  Use :func:`score_batch`."""
    mv, _ = _mv()
    pred = mv.parse("\\boxed{" + answer + "}",
                    extraction_config=[mv.LatexExtractionConfig(boxed_match_priority=0),
                                       mv.ExprExtractionConfig()],
                    extraction_mode="first_match", parsing_timeout=None)
    return 1.0 if _verify(_parse_gold(str(gold), "auto"), pred) else 0.0


def _answer_key(parsed) -> str | None:
    """A canonical string for majority voting: equal numbers give equal keys (0.5 and 1/2 -> '1/2')."""
    if not parsed:
        return None
    expr = parsed[0]
    try:
        import sympy

        if isinstance(expr, sympy.Float):
            expr = sympy.nsimplify(expr, rational=True)
        if isinstance(expr, sympy.Basic):
            key = str(expr)
        else:
            key = str(parsed[-1])
    except Exception:  # noqa: BLE001
        key = str(parsed[-1])
    return key[:MAX_ANSWER_CHARS]


def eval_correct(completion: str, gold: str, gold_format: str = "latex") -> tuple[bool, str | None]:
    """Unbounded: the seed's ``matheval.py`` rule judge on the full completion -> (correct, answer key for voting).
    Use :func:`eval_score_batch` for the time bound."""
    mv, cfg = _mv()
    answer = mv.parse(completion, extraction_config=cfg, extraction_mode="first_match", parsing_timeout=None)
    if not answer:
        return False, None
    return _verify(_parse_gold(str(gold), gold_format), answer), _answer_key(answer)
