"""The vocabulary head's log-sum-exp on XLA:CPU: one [680, 49152] float32 chunk of logits (``vocab_logprobs``'
chunk at SmolLM2's vocabulary without vocabulary blocks; on single-device XLA:CPU it now applies ``logsumexp_rows``
to [1024, 2048] blocks, ``Tuning.vocab_block``) through ``jax.nn.logsumexp`` (XLA fuses the exp into a YNNPACK
reduction) against ``ops/vocab_logprobs.py: logsumexp_rows`` (the sum of exponentials as a GEMV against ones).
Best of 7 after a warm-up. By default each call's fresh output buffers are page-faulted in, as a standalone jit call
does; ``--no-faults`` dispatches synchronously with glibc keeping freed memory, which is closer to the chunk loop
inside the update (its buffers are reused from chunk to chunk).

    python benchmarks/bench_cpu_lse.py [--no-faults]
    python benchmarks/bench_cpu_lse.py --small    # [64, 2048], one repeat: a smoke run
"""

import argparse
import ctypes
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--small", action="store_true", help="[64, 2048] logits, one repeat: a smoke run")
    args = ap.parse_args()
    (rows, cols), repeats = ((64, 2048), 1) if args.small else ((680, 49152), 7)
    if args.no_faults:  # before any large allocation: no mmap for large blocks, no trimming
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    import jax
    import jax.numpy as jnp
    import numpy as np

    from softgrpo_jax.ops.vocab_logprobs import logsumexp_rows

    if args.no_faults:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    x = jnp.asarray(np.random.RandomState(0).randn(rows, cols) * 3, jnp.float32)
    ref = np.asarray(jax.nn.logsumexp(np.asarray(x, np.float64), axis=-1))
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; [{rows}, {cols}] float32; page faults "
          f"{'avoided' if args.no_faults else 'as a standalone call has them'}\n")
    print(f"| log-sum-exp | ms (best of {repeats}) | max abs error vs float64 |")
    print("|---|---|---|")
    for name, fn in (("jax.nn.logsumexp", lambda a: jax.nn.logsumexp(a, axis=-1)),
                     ("logsumexp_rows (GEMV against ones)", logsumexp_rows)):
        f = jax.jit(fn)
        out = jax.block_until_ready(f(x))
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(x))
            ts.append(time.perf_counter() - t)
        print(f"| {name} | {1e3 * min(ts):.1f} | {np.abs(np.asarray(out, np.float64) - ref).max():.1e} |")


if __name__ == "__main__":
    main()
