"""The reward worker process and its wire protocol (the child side of :mod:`softgrpo_jax.rewards.pool`).

A worker is a separate interpreter (``python -m softgrpo_jax.rewards --worker``) so that a check stuck in sympy can
be killed without touching the caller.  Messages are pickles framed by an 8-byte length, over the worker's stdin and
stdout: the worker announces ``("ready", pid)`` once math-verify is imported, then answers each
``(task_id, name, args)`` with ``(task_id, ok, value)``; ``None`` or end of input stops it.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time

from softgrpo_jax.rewards.verify import _mv, eval_correct, math_verify_answer_correct

_TASKS = {"math_verify": math_verify_answer_correct, "eval": eval_correct, "sleep": time.sleep}

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
    import signal

    # a terminal's Ctrl-C (and a scheduler's SIGTERM) reaches the whole process group: the parent stops gracefully
    # and still needs the checks in flight; the worker ends when the parent closes its input or dies (below)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    try:  # die with the parent even while stuck in a C-level computation (Linux)
        import ctypes

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
