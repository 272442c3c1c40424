"""Evaluation metrics and reports: pass@1, pass@k (the seed's first-k and the unbiased estimator), maj@k, lengths.

Per-benchmark results are a list of per-problem records (JSON-friendly):

``{"id": str, "gold": str, "correct": [bool] * n, "answers": [str | None] * n,
   "response_tokens": [int] * n, "thinking_tokens": [int] * n, "unverified": int}``

``answers`` (canonical answers from :func:`softgrpo_jax.rewards.eval_score_batch`, used for maj@k) and the length
lists are optional.  ``n`` (samples per problem; the seed uses 32) may differ between problems.

Metrics (docs/algorithm.md, "Evaluation"):

* ``pass@1``: mean correctness over samples, averaged over problems.
* ``pass@k`` (as the seed's ``matheval.py``): ``max(correct[:k])`` over the *first k* samples, averaged over problems;
  for ``k > n`` this is the max over all n (so pass@64 == pass@32 with 32 samples, as in the seed's tables).
* ``unbiased_pass@k`` (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``, averaged over problems; reported only when
  every problem has ``n >= k``.
* ``maj@k``: majority vote over the first k samples' answers (no answer = no vote; ties go to the answer seen first);
  correct when the winning answer's samples are; reported for ``k <= min n``.
* ``mean_response_tokens`` / ``mean_thinking_tokens``: over all samples.
* ``unverified``: samples whose check did not finish (past the time limit, or the checker crashed), scored wrong;
  where the records carry an ``unverified`` count.

Reports: per-benchmark JSON, a markdown table, a PNG of pass@k against k.  Every write is atomic.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from softgrpo_jax.fs import default_file_mode

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)


# ------------------------------------------------------------------------------------------------------------------
# estimators
# ------------------------------------------------------------------------------------------------------------------

def _as_rows(correct) -> list[np.ndarray]:
    if isinstance(correct, np.ndarray) and correct.ndim == 2:
        return [np.asarray(r, bool) for r in correct]
    return [np.asarray(r, bool).reshape(-1) for r in correct]


def pass_at_k_first(correct, k: int) -> float:
    """The seed's pass@k: mean over problems of ``max(correct[p][:k])`` (first k samples; all when k > n)."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    rows = _as_rows(correct)
    if not rows:
        return float("nan")
    return float(np.mean([bool(r[:k].any()) for r in rows]))


def pass_at_k_unbiased_one(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased estimate for one problem with ``c`` correct of ``n`` samples: 1 - C(n-c, k)/C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n (got c={c}, n={n})")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    # numerically stable product form: prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_unbiased(correct, k: int) -> float:
    """Mean over problems of :func:`pass_at_k_unbiased_one`; NaN when some problem has fewer than k samples."""
    rows = _as_rows(correct)
    if not rows or any(len(r) < k for r in rows):
        return float("nan")
    return float(np.mean([pass_at_k_unbiased_one(len(r), int(r.sum()), k) for r in rows]))


def majority_vote(answers: Sequence, correct: Sequence[bool]) -> bool:
    """Whether the most common non-None answer is correct (ties: the answer seen first; no answers: False)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    for a, ok in zip(answers, correct):  # first-seen among the tied leaders
        if a is not None and votes[a] == top:
            return bool(ok)
    return False


def maj_at_k(answers: Sequence[Sequence], correct, k: int) -> float:
    """maj@k over problems: majority vote among the first k samples' (normalised) answers."""
    rows = _as_rows(correct)
    if not rows:
        return float("nan")
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answer lists for {len(rows)} problems")
    return float(np.mean([majority_vote(list(a)[:k], list(r)[:k]) for a, r in zip(answers, rows)]))


# ------------------------------------------------------------------------------------------------------------------
# answer normalisation for voting when answers are raw strings
# ------------------------------------------------------------------------------------------------------------------

_FRAC_RE = re.compile(r"^\\frac\{(-?\d+)\}\{(-?\d+)\}$")


def normalize_answer(text: str | None) -> str | None:
    """A voting key for a raw answer string (e.g. a box's content): Hendrycks :func:`strip_string`, ``\\text{}``
    and thousands separators dropped, numbers canonicalised (``0.5``, ``1/2``, ``\\frac{1}{2}`` -> ``1/2``)."""
    if text is None:
        return None
    from softgrpo_jax.rewards import strip_string

    s = text.strip()
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", s)
    try:
        s = strip_string(s)
    except Exception:  # noqa: BLE001
        pass
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = _FRAC_RE.match(s)
    try:
        if m:
            return str(Fraction(int(m.group(1)), int(m.group(2))))
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
            return str(Fraction(s))
    except (ValueError, ZeroDivisionError):
        pass
    return s or None


# ------------------------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------------------------

def thinking_length(token_ids: Sequence[int], think_end_id: int | None) -> int:
    """Tokens of a response up to and including its first ``</think>``; the whole response if thinking never ends."""
    ids = list(token_ids)
    if think_end_id is not None and think_end_id in ids:
        return ids.index(think_end_id) + 1
    return len(ids)


def _mean_of_lists(results, key) -> float | None:
    vals = [v for r in results for v in (r.get(key) or [])]
    return float(np.mean(vals)) if vals else None


def summarize(results: Sequence[Mapping], *, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Metrics for one benchmark's per-problem results (see the module docstring for the record and the keys)."""
    if not results:
        raise ValueError("summarize: no results")
    correct = [np.asarray(r["correct"], bool).reshape(-1) for r in results]
    if any(len(c) == 0 for c in correct):
        raise ValueError("summarize: a problem has no samples")
    ns = [len(c) for c in correct]
    out: dict = {"n_problems": len(results), "n_samples": min(ns) if min(ns) == max(ns) else [min(ns), max(ns)],
                 "pass@1": float(np.mean([c.mean() for c in correct]))}
    have_answers = all(r.get("answers") is not None for r in results)
    answers = [list(r["answers"]) for r in results] if have_answers else None
    for k in ks:
        if k != 1:  # pass@1 is the mean over all samples, not the first sample's score
            out[f"pass@{k}"] = pass_at_k_first(correct, k)
        if k <= min(ns):
            out[f"unbiased_pass@{k}"] = pass_at_k_unbiased(correct, k)
            if answers is not None:
                out[f"maj@{k}"] = maj_at_k(answers, correct, k)
    out["ks"] = [int(k) for k in ks]
    out["mean_response_tokens"] = _mean_of_lists(results, "response_tokens")
    out["mean_thinking_tokens"] = _mean_of_lists(results, "thinking_tokens")
    if all("unverified" in r for r in results):  # samples whose check did not finish (scored wrong)
        out["unverified"] = int(sum(r["unverified"] for r in results))
    return out


# ------------------------------------------------------------------------------------------------------------------
# writers (atomic)
# ------------------------------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; a report gets a plain file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str, obj) -> str:
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


def write_benchmark_json(out_dir: str, benchmark: str, summary: Mapping, results: Sequence[Mapping] | None = None,
                         *, config: Mapping | None = None) -> str:
    """``<out_dir>/<benchmark>.json`` with the summary, the run config and (optionally) the per-problem results."""
    obj = {"benchmark": benchmark, "summary": dict(summary)}
    if config is not None:
        obj["config"] = dict(config)
    if results is not None:
        obj["results"] = list(results)
    return write_json(os.path.join(out_dir, f"{benchmark}.json"), obj)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def markdown_table(summaries: Mapping[str, Mapping], *, ks: Sequence[int] | None = None,
                   maj_ks: Sequence[int] | None = None) -> str:
    """Benchmarks as rows; pass@1, pass@k (first-k), unbiased pass@k, maj@k in percent, mean lengths in tokens."""
    if not summaries:
        return ""
    first = next(iter(summaries.values()))
    ks = [k for k in (ks or first.get("ks", DEFAULT_KS)) if k != 1]
    maj_ks = list(maj_ks) if maj_ks is not None else [k for k in ks if any(f"maj@{k}" in s for s in summaries.values())]
    cols = (["pass@1"] + [f"pass@{k}" for k in ks]
            + [f"unbiased_pass@{k}" for k in ks if any(f"unbiased_pass@{k}" in s for s in summaries.values())]
            + [f"maj@{k}" for k in maj_ks])
    unverified = any(s.get("unverified") for s in summaries.values())
    head = ["benchmark", "problems", "samples"] + cols + ["response tokens", "thinking tokens"] + (
        ["unverified"] if unverified else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, s in summaries.items():
        n_samples = s.get("n_samples")
        cells = [name, str(s.get("n_problems", "")), str(n_samples if not isinstance(n_samples, list)
                                                            else "-".join(map(str, n_samples)))]
        cells += [_pct(s.get(c)) for c in cols]
        for key in ("mean_response_tokens", "mean_thinking_tokens"):
            v = s.get(key)
            cells.append("-" if v is None else f"{v:.0f}")
        if unverified:  # the verifier timed out or crashed on these samples, which count as wrong
            cells.append(str(s.get("unverified", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, summaries: Mapping[str, Mapping], *, title: str | None = None, **kw) -> str:
    text = (f"# {title}\n\n" if title else "") + markdown_table(summaries, **kw)
    return atomic_write_text(path, text)


def plot_pass_at_k(path: str, summaries: Mapping[str, Mapping], *, title: str | None = None) -> str:
    """PNG of pass@k against k (log2 axis): solid the seed's first-k estimate, dashed the unbiased one."""
    from matplotlib.figure import Figure  # no pyplot: the Agg renderer, no global backend state


    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, s) in enumerate(summaries.items()):
        color = f"C{i % 10}"
        ks = sorted(k for k in s.get("ks", DEFAULT_KS) if s.get(f"pass@{k}") is not None)
        if ks:
            ax.plot(ks, [100 * s[f"pass@{k}"] for k in ks], "o-", color=color, label=name)
        uks = [k for k in ks if s.get(f"unbiased_pass@{k}") is not None]
        if uks:
            ax.plot(uks, [100 * s[f"unbiased_pass@{k}"] for k in uks], "--", color=color, alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "pass@k (solid: first k samples; dashed: unbiased)")
    if summaries:
        ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_reports(out_dir: str, per_benchmark: Mapping[str, Sequence[Mapping]], *, ks: Sequence[int] = DEFAULT_KS,
                  config: Mapping | None = None, title: str | None = None) -> dict:
    """Summaries of every benchmark + ``<b>.json`` each, ``summary.md``, ``summary.json`` and ``pass_at_k.png``."""
    summaries = {b: summarize(res, ks=ks) for b, res in per_benchmark.items()}
    for b, res in per_benchmark.items():
        write_benchmark_json(out_dir, b, summaries[b], res, config=config)
    write_json(os.path.join(out_dir, "summary.json"), {"summaries": summaries, "config": dict(config or {})})
    write_markdown(os.path.join(out_dir, "summary.md"), summaries, title=title)
    plot_pass_at_k(os.path.join(out_dir, "pass_at_k.png"), summaries, title=title)
    return summaries
