"""The worker pool: the time bound on every math-verify check.

Each worker process (:mod:`softgrpo_jax.rewards.worker`, started with ``subprocess``, so no fork of a JAX process and
no re-import of the user's ``__main__``) gets one task at a time; a task that runs past ``timeout_s`` has its worker
killed and replaced, scores the caller's default and is counted in ``pool.stats.timeouts``.
"""

from __future__ import annotations

import atexit
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from softgrpo_jax.errors import UserError
from softgrpo_jax.rewards.worker import _recv, _send

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class RewardWorkerError(UserError, RuntimeError):
    """The reward workers cannot start (math-verify missing, a broken environment): the command line's one line."""


class _Worker:
    def __init__(self, mem_mb: int | None):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env["SOFTGRPO_REWARD_WORKER_MEM_MB"] = str(mem_mb or 0)
        env.pop("XLA_FLAGS", None)
        # the worker imports this package by name: make it findable however the parent found it
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        self._start_failures = 0  # workers that died before they were ready, since one last became ready
        self._closed = False
        atexit.register(self.close)

    # -- read-only views
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def processes(self) -> tuple[subprocess.Popen, ...]:
        """The worker processes, in slot order: a snapshot (a replaced worker's successor shows on the next read)."""
        return tuple(w.proc for w in self._workers)

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
        """Run ``_TASKS[name](*args)`` (:mod:`softgrpo_jax.rewards.worker`) for each args tuple; a task that times
        out or raises gives ``default``."""
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
                        raise RewardWorkerError(f"reward worker did not start within {self.start_timeout_s:.0f}s "
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
                        elif not w.ready:  # (replacements of timed-out workers do not count)
                            self._start_failures += 1
                            if self._start_failures > 2 * self.n + 2:
                                raise RewardWorkerError(
                                    f"reward workers keep dying at start-up ({self._start_failures} in a row); run "
                                    f"'{sys.executable} -m softgrpo_jax.rewards --worker' to see why")
                        self._replace(i)
                        continue
                    if not w.ready:
                        w.ready = True
                        self._start_failures = 0
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
        if pool is None or pool.closed:
            pool = _DEFAULT_POOLS[n] = ScoringPool(n, timeout_s=timeout_s)
        return pool
