"""Answer checking: the training reward and the evaluation scorer, bounded in time.

Three checkers (SPEC.md section 4 "Reward" and section 5 "Scoring"):

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

Time bound.  math-verify's own timeouts use ``signal.alarm`` (main thread only), so every call here passes
``parsing_timeout=None`` / ``timeout_seconds=None`` and the bound comes from a :class:`ScoringPool`: worker *processes*
(``python -m softgrpo_jax.rewards --worker``, started with ``subprocess``, so no fork of a JAX process and no re-import
of the user's ``__main__``) each get one task at a time; a task that runs past ``timeout_s`` has its worker killed and
replaced, scores 0 and is counted in ``pool.stats["timeouts"]``.  Cheap pre-filters (answer length, brace depth,
completion size) reject absurd inputs before they cost a worker.  ``workers=0`` scores in the calling process with no
time bound (trusted inputs, debugging).

math-verify is imported lazily (only workers and ``workers=0`` need it), so this module imports on machines without it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import pickle
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MODES = ("math_verify", "strict_string", "math_verify_lenient")
GOLD_FORMATS = ("latex", "expr")
# gold parsing of the seed's matheval.py, per benchmark (AIMEEvaluator / GSM8KEvaluator: Expr; MATH500 / AMC: Latex)
BENCHMARK_GOLD_FORMAT = {"aime24": "expr", "aime25": "expr", "aime2024": "expr", "aime2025": "expr", "gsm8k": "expr",
                         "math500": "latex", "amc23": "latex", "olympiad_bench": "latex"}

# pre-filter defaults: no real final answer is longer or deeper; no real 32k-token completion is bigger
MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 32
MAX_COMPLETION_CHARS = 400_000
DEFAULT_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------------------------
# Hendrycks MATH normalisation (the original's strict string reward), written from its published definition
# ----------------------------------------------------------------------------------------------------------------

def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` substring (braces matched), or ``"\\boxed x"`` form, or None.

    As the original: if ``"\\boxed "`` (with a space) occurs anywhere, the text after its last occurrence up to the
    next ``$`` wins, even when a later ``\\boxed{`` exists.
    """
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        c = string[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return string[idx:i + 1]
    return None


def remove_boxed(s: str) -> str | None:
    """``\\boxed{x}`` / ``\\fbox{x}`` / ``\\boxed x`` -> ``x``; None if ``s`` has none of these shapes.

    (The original's ``remove_boxed`` asserts on ``\\fbox{`` and so scores every ``\\fbox`` answer 0; here ``\\fbox``
    is unwrapped like ``\\boxed``, as SPEC.md section 4 describes the intent.)
    """
    for left in ("\\boxed ",):
        if s.startswith(left):
            return s[len(left):]
    for left in ("\\boxed{", "\\fbox{"):
        if s.startswith(left) and s.endswith("}"):
            return s[len(left):-1]
    return None


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr and substr[0] == "{":
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    # "\text{ " only ever occurs (in the MATH answers) when describing units
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:  # the original asserts here; is_equiv then falls back to raw equality
            raise ValueError("more than one '\\text{ ' in answer")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if not split:  # the original indexes split[0] and raises; is_equiv then falls back to raw equality
            raise ValueError("dangling \\sqrt")
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """Hendrycks-MATH answer normalisation (``math_equivalence.strip_string``)."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 3" -> "3" when the left side is short
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """The original's comparison: equal after :func:`strip_string`; raw equality if normalisation raises."""
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:  # noqa: BLE001 - the original's behaviour
        return str1 == str2


def strict_string_reward(completion: str, gold: str) -> float:
    """SPEC.md section 4: 1.0 iff the last box, Hendrycks-normalised, equals the normalised gold."""
    boxed = last_boxed_only_string(completion)
    if boxed is None:
        return 0.0
    answer = remove_boxed(boxed)
    return 1.0 if answer is not None and is_equiv(answer, str(gold)) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Robust extraction (math_verify mode and answer voting)
# ----------------------------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_lenient_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` if there is one, else the last number in the text (commas dropped).

    The fallback is for tiny models (the embedded SmolLM2-135M rarely writes a box); the seed's reward has no such
    fallback. Only the last 2000 characters are searched, so the cost is bounded."""
    boxed = extract_boxed_answer(text)
    if boxed is not None:
        return boxed
    nums = _NUMBER_RE.findall(text[-2000:])
    return nums[-1].replace(",", "") if nums else None


def extract_boxed_answer(text: str) -> str | None:
    """Content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed x``) in ``text``; None if there is none
    or its braces never close.  Linear time."""
    i_boxed, i_fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    idx = max(i_boxed, i_fbox)
    if idx < 0:
        return None
    j = idx + (len("\\boxed") if idx == i_boxed else len("\\fbox"))
    if j < len(text) and text[j] == " ":  # "\boxed 5" form: up to "$" or end of line
        rest = text[j + 1:]
        end = min((k for k in (rest.find("$"), rest.find("\n")) if k >= 0), default=len(rest))
        return rest[:end].strip() or None
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


def brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c == "{":
            depth += 1
            best = max(best, depth)
        elif c == "}":
            depth -= 1
    return best


def _answer_ok(answer: str | None, max_answer_chars: int, max_brace_depth: int) -> bool:
    return (answer is not None and answer.strip() != "" and len(answer) <= max_answer_chars
            and brace_depth(answer) <= max_brace_depth)


# ----------------------------------------------------------------------------------------------------------------
# math-verify calls (run inside workers, or inline with workers=0).  Never use math-verify's signal-based timeouts.
# ----------------------------------------------------------------------------------------------------------------

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


_TASKS = {"math_verify": math_verify_answer_correct, "eval": eval_correct, "sleep": time.sleep}


# ----------------------------------------------------------------------------------------------------------------
# Worker pool with per-task timeout
# ----------------------------------------------------------------------------------------------------------------

_HDR = struct.Struct("<Q")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HDR.pack(len(data)) + data)
    stream.flush()


def _recv_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            raise EOFError
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _recv(fd: int):
    (n,) = _HDR.unpack(_recv_exact(fd, _HDR.size))
    return pickle.loads(_recv_exact(fd, n))


def _worker_main() -> None:  # pragma: no cover - runs in the worker process
    try:  # die with the parent even while stuck in a C-level computation (Linux)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)
    except Exception:  # noqa: BLE001
        pass
    mem = int(os.environ.get("SOFTGRPO_REWARD_WORKER_MEM_MB", "0"))
    _mv()  # import math-verify / sympy before announcing readiness
    if mem > 0:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (mem << 20, mem << 20))
        except Exception:  # noqa: BLE001
            pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    _send(stdout, ("ready", os.getpid()))
    fd = stdin.fileno()
    while True:
        try:
            msg = _recv(fd)
        except EOFError:
            return
        if msg is None:
            return
        task_id, name, args = msg
        try:
            _send(stdout, (task_id, True, _TASKS[name](*args)))
        except MemoryError:
            _send(stdout, (task_id, False, "MemoryError"))
        except Exception as e:  # noqa: BLE001
            _send(stdout, (task_id, False, f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, mem_mb: int | None):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env["SOFTGRPO_REWARD_WORKER_MEM_MB"] = str(mem_mb or 0)
        env.pop("XLA_FLAGS", None)
        # the worker imports this package by name: make it findable however the parent found it
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "softgrpo_jax.rewards", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.ready = False
        self.started = time.monotonic()
        self.task: tuple[int, float] | None = None  # (task index, deadline)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        try:
            _send(self.proc.stdin, None)
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        self.kill()


@dataclass
class PoolStats:
    tasks: int = 0
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0
    last_errors: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"tasks": self.tasks, "timeouts": self.timeouts, "errors": self.errors, "restarts": self.restarts}


class ScoringPool:
    """Worker processes that run checker tasks one at a time each, killing any task past its deadline.

    ``run`` is thread-safe (calls are serialised).  A killed worker is replaced at once, off the critical path:
    the other workers keep going while it starts.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, workers: int = 2, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_limit_mb: int | None = 4096,
                 start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"ScoringPool needs workers >= 1 (got {workers}); use workers=0 in score_batch "
                             "to score in-process without a pool")
        self.n, self.timeout_s, self.mem_mb, self.start_timeout_s = workers, timeout_s, memory_limit_mb, start_timeout_s
        self._lock = threading.Lock()
        self._workers: list[_Worker] = [_Worker(memory_limit_mb) for _ in range(workers)]
        self.stats = PoolStats()
        self._closed = False
        atexit.register(self.close)

    # -- lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.mem_mb)
        self.stats.restarts += 1

    # -- work
    def run(self, name: str, args_list: Sequence[tuple], *, timeout_s: float | None = None, default=None) -> list:
        """Run ``_TASKS[name](*args)`` for each args tuple; a task that times out or raises gives ``default``."""
        if self._closed:
            raise RuntimeError("ScoringPool is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            return self._run(name, list(args_list), timeout, default)

    def _run(self, name, args_list, timeout, default) -> list:
        results = [default] * len(args_list)
        pending = deque(range(len(args_list)))
        sel = selectors.DefaultSelector()
        try:
            while pending or any(w.task for w in self._workers):
                now = time.monotonic()
                for i, w in enumerate(self._workers):
                    if w.ready and w.task is None and pending:
                        t = pending.popleft()
                        try:
                            _send(w.proc.stdin, (t, name, args_list[t]))
                            w.task = (t, time.monotonic() + timeout)
                            self.stats.tasks += 1
                        except (BrokenPipeError, OSError):  # worker died while idle: retry the task elsewhere
                            pending.appendleft(t)
                            self._replace(i)
                    elif not w.ready and now - w.started > self.start_timeout_s:
                        raise RuntimeError(f"reward worker did not start within {self.start_timeout_s:.0f}s "
                                           f"(command: {sys.executable} -m softgrpo_jax.rewards --worker); "
                                           "is math-verify installed in this environment?")
                waiting = {w.fd: (i, w) for i, w in enumerate(self._workers) if (w.task is not None or not w.ready)}
                if not waiting:
                    continue
                deadlines = [w.task[1] for _, w in waiting.values() if w.task is not None]
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
                for fd, (i, w) in waiting.items():
                    sel.register(fd, selectors.EVENT_READ, (i, w))
                events = sel.select(timeout=min(wait, 1.0))
                for fd in list(waiting):
                    sel.unregister(fd)
                for key, _ in events:
                    i, w = key.data
                    try:
                        msg = _recv(w.fd)
                    except (EOFError, OSError):  # worker died (crash, OOM kill)
                        if w.task is not None:
                            self.stats.errors += 1
                            self._note(f"worker died on task {w.task[0]}")
                        elif not w.ready and self.stats.restarts > 4 * self.n + 8:
                            raise RuntimeError("reward workers keep dying at start-up; run "
                                               f"'{sys.executable} -m softgrpo_jax.rewards --worker' to see why")
                        self._replace(i)
                        continue
                    if not w.ready:
                        w.ready = True
                        continue
                    task_id, ok, value = msg
                    if w.task is None or task_id != w.task[0]:
                        continue  # stale answer
                    w.task = None
                    if ok:
                        results[task_id] = value
                    else:
                        self.stats.errors += 1
                        self._note(f"task {task_id}: {value}")
                now = time.monotonic()
                for i, w in enumerate(self._workers):
                    if w.task is not None and now > w.task[1]:
                        self.stats.timeouts += 1
                        log.debug("reward check timed out after %.1fs (task %d); worker killed and replaced",
                                  timeout, w.task[0])
                        self._replace(i)
        finally:
            sel.close()
        return results

    def _note(self, msg: str) -> None:
        self.stats.last_errors = (self.stats.last_errors + [msg])[-20:]


_DEFAULT_POOLS: dict[int, ScoringPool] = {}
_DEFAULT_LOCK = threading.Lock()


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def get_pool(workers: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ScoringPool:
    """The process-wide pool with ``workers`` workers (created on first use, closed at exit)."""
    n = default_workers() if workers is None else workers
    with _DEFAULT_LOCK:
        pool = _DEFAULT_POOLS.get(n)
        if pool is None or pool._closed:
            pool = _DEFAULT_POOLS[n] = ScoringPool(n, timeout_s=timeout_s)
        return pool


# ----------------------------------------------------------------------------------------------------------------
# Public scoring API
# ----------------------------------------------------------------------------------------------------------------

def score_batch(completions: Sequence[str], golds: Sequence[str], *, mode: str = "math_verify",
                workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, pool: ScoringPool | None = None,
                max_answer_chars: int = MAX_ANSWER_CHARS, max_brace_depth: int = MAX_BRACE_DEPTH) -> np.ndarray:
    """Rewards (float32 [N], each 1.0 or 0.0) for decoded responses against gold answers.

    ``mode="math_verify"``: the last box's content goes to a pool worker (``pool``, or the shared pool of ``workers``
    processes; ``workers=0``: in-process, unbounded) and is compared with math-verify; a check past ``timeout_s``
    scores 0.  Answers longer than ``max_answer_chars`` or nested deeper than ``max_brace_depth`` score 0 unchecked.
    ``mode="strict_string"``: the original's boxed-string reward, in-process (linear time, no pool).
    """
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; choose one of {MODES}")
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    out = np.zeros(len(completions), np.float32)
    if mode == "strict_string":
        for i, (c, g) in enumerate(zip(completions, golds)):
            out[i] = strict_string_reward(c, str(g))
        return out
    todo, args = [], []
    extract = extract_lenient_answer if mode == "math_verify_lenient" else extract_boxed_answer
    for i, (c, g) in enumerate(zip(completions, golds)):
        ans = extract(c)
        if _answer_ok(ans, max_answer_chars, max_brace_depth):
            todo.append(i)
            args.append((ans, str(g)))
    if not todo:
        return out
    if workers == 0 and pool is None:
        vals = [math_verify_answer_correct(*a) for a in args]
    else:
        vals = (pool or get_pool(workers, timeout_s=timeout_s)).run("math_verify", args, timeout_s=timeout_s,
                                                                     default=0.0)
    out[todo] = np.asarray(vals, np.float32)
    return out


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


def eval_score_batch(completions: Sequence[str], golds: Sequence[str] | str, *, gold_format: str | Sequence[str] = "latex",
                     workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, pool: ScoringPool | None = None,
                     max_completion_chars: int = MAX_COMPLETION_CHARS) -> EvalScores:
    """SPEC.md section 5 scoring of full completions (thinking included).  ``gold_format`` is ``"expr"`` (AIME,
    GSM8K) or ``"latex"`` (MATH-500, AMC), one for all or one per item; :data:`BENCHMARK_GOLD_FORMAT` maps benchmark
    names.  Completions over ``max_completion_chars`` score 0 unchecked; a check past ``timeout_s`` scores 0."""
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
    if args:
        if workers == 0 and pool is None:
            vals = [eval_correct(*a) for a in args]
        else:
            p = pool or get_pool(workers, timeout_s=timeout_s)
            before = p.stats.timeouts
            vals = p.run("eval", args, timeout_s=timeout_s, default=(False, None))
            timeouts = p.stats.timeouts - before
        for i, (ok, key) in zip(todo, vals):
            correct[i], answers[i] = bool(ok), key
    return EvalScores(correct, answers, timeouts)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
