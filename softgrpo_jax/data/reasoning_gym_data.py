"""The embedded default data set: arithmetic word problems generated offline by reasoning-gym.

Every task is a stream of problems drawn from ``reasoning_gym.create_dataset(task, seed=..., size=...)``.  Splits are
filled per task in a fixed order, **test first**, skipping any problem whose normalised question text was already
used (in either split, any task): train and test therefore share no problem, and the test split does not change when
only the train size changes.  Answers are kept only if they are plain numbers (integer, decimal or ``a/b``), so the
math-verify reward can check them; other rows are skipped and counted.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# (task, weight, reasoning-gym config overrides): short integer-answer problems that a 135M model can learn
DEFAULT_TASKS: tuple = (
    ("gsm_symbolic", 0.35, ()),
    ("basic_arithmetic", 0.2, (("min_terms", 2), ("max_terms", 4), ("min_digits", 1), ("max_digits", 2))),
    ("chain_sum", 0.2, (("min_terms", 2), ("max_terms", 4), ("min_digits", 1), ("max_digits", 2))),
    ("simple_equations", 0.1, ()),
    ("gcd", 0.05, ()),
    ("lcm", 0.05, ()),
    ("leg_counting", 0.05, ()),
)
_NUMBER_RE = re.compile(r"^-?\d+(\.\d+)?(/\d+)?$")


def parse_tasks(text: str) -> tuple:
    """``data.reasoning_gym.tasks`` as ``generate`` takes it: comma-separated task names (equal weights, default
    settings) or a Python literal ``((name, weight, ((key, value), ...)), ...)``; raises ValueError / SyntaxError."""
    text = text.strip()
    if text[:1] in ("(", "["):
        import ast

        v = ast.literal_eval(text)
        if not isinstance(v, (tuple, list)):
            raise ValueError(f"{text} is not a tuple of tasks")
        return tuple(v)
    return tuple(t.strip() for t in text.split(",") if t.strip())


def task_problems(tasks: Sequence) -> list[str]:
    """What is wrong with ``tasks`` (names reasoning-gym does not have, weights, settings its task config refuses),
    one message each; empty when ``generate`` can use them (or reasoning-gym is not installed here: the machine
    that generates the problems checks them)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return []

    out, weights = [], []
    for t in tasks:
        if isinstance(t, str):
            t = (t, 1.0)
        if not isinstance(t, (tuple, list)) or not 2 <= len(t) <= 3 or not isinstance(t[0], str):
            out.append(f"{t!r} is not a task name or (name, weight[, ((key, value), ...)])")
            continue
        name = t[0]
        if name not in DATASETS:
            import difflib

            close = difflib.get_close_matches(name, sorted(DATASETS), n=3)
            out.append(f"reasoning-gym has no task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                  else ""))
            continue
        if isinstance(t[1], bool) or not isinstance(t[1], (int, float)) or not t[1] >= 0:
            out.append(f"task {name!r}: the weight {t[1]!r} is not a number >= 0")
            continue
        weights.append(float(t[1]))
        items = t[2] if len(t) > 2 and t[2] else ()
        try:
            kw = dict(items)
        except (TypeError, ValueError):
            out.append(f"task {name!r}: its settings {items!r} are not ((key, value), ...) pairs")
            continue
        if {"seed", "size"} & set(kw):
            out.append(f"task {name!r}: its seed and size come from data.reasoning_gym.seed / train_size / "
                       "test_size, not from its settings")
            continue
        try:
            c = DATASETS[name][1](**kw)
            if hasattr(c, "validate"):
                c.validate()
        except Exception as e:  # noqa: BLE001 - the task's own checks (asserts, TypeErrors)
            out.append(f"task {name!r} refuses the settings {kw}: {type(e).__name__}: {e}")
    if not out and not sum(weights) > 0:
        out.append("the task weights sum to 0")
    return out


def normalize_question(q: str) -> str:
    """Key for de-duplication: case-folded, whitespace collapsed."""
    return " ".join(q.split()).casefold()


def _clean_answer(a) -> str | None:
    a = str(a).strip().strip("$").strip()
    return a if _NUMBER_RE.match(a) else None


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` by ``weights`` (largest remainder), summing exactly to ``total``."""
    wsum = float(sum(weights))
    if total < 0 or wsum <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"cannot allocate {total} examples with weights {list(weights)}")
    raw = [total * w / wsum for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class GeneratedSplits:
    train: list
    test: list
    skipped: dict  # task -> rows rejected (non-numeric answer, empty question)
    duplicates: dict  # task -> generated problems dropped as duplicates
    shortfall: dict  # task -> examples the task could not supply (ran out of unique problems)


def generate(tasks: Sequence = DEFAULT_TASKS, *, train_size: int = 8192, test_size: int = 512, seed: int = 1234,
             max_draws_factor: int = 20) -> GeneratedSplits:
    """Generate disjoint train/test splits.  ``tasks``: (name, weight[, config items]) tuples."""
    import reasoning_gym

    specs = []
    for t in tasks:
        if isinstance(t, str):
            t = (t, 1.0, ())
        name, weight = t[0], float(t[1])
        cfg = dict(t[2]) if len(t) > 2 and t[2] else {}
        specs.append((name, weight, cfg))
    weights = [w for _, w, _ in specs]
    n_test, n_train = allocate(test_size, weights), allocate(train_size, weights)
    used: set[str] = set()
    train, test = [], []
    skipped, duplicates, shortfall = {}, {}, {}
    for ti, (name, _, cfg) in enumerate(specs):
        want = n_test[ti] + n_train[ti]
        if want == 0:
            continue
        size = max(want * max_draws_factor, 16)
        try:
            ds = reasoning_gym.create_dataset(name, seed=seed + 7919 * ti, size=size, **cfg)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"reasoning-gym task {name!r} with config {cfg} failed: {e}") from e
        got, sk, dup = [], 0, 0
        for j in range(size):
            item = ds[j]
            q = str(item.get("question", "")).strip()
            a = _clean_answer(item.get("answer", ""))
            if not q or a is None:
                sk += 1
                continue
            key = normalize_question(q)
            if key in used:
                dup += 1
                continue
            used.add(key)
            got.append({"id": f"{name}-{j}", "question": q, "answer": a, "source": f"reasoning_gym/{name}"})
            if len(got) == want:
                break
        skipped[name], duplicates[name] = sk, dup
        if len(got) < want:
            shortfall[name] = want - len(got)
            log.warning("reasoning-gym task %s gave only %d unique problems of %d wanted", name, len(got), want)
        k = min(n_test[ti], len(got))
        test.extend(got[:k])
        train.extend(got[k:])
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(test)
    return GeneratedSplits(train, test, skipped, duplicates, shortfall)
