"""``python -m softgrpo_jax.rewards --worker``: run one reward worker process (:mod:`softgrpo_jax.rewards.worker`).

The entry point the pool starts, kept at the package so the command is the same as before the package split.
"""

import sys

from softgrpo_jax.rewards.worker import _worker_main

if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
