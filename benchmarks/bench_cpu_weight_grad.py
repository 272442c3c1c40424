"""The bf16 weight-gradient GEMM on XLA:CPU: x.T @ g ([4096, 576] x [4096, 1536], SmolLM2's MLP at 16 x 256 tokens)
as plain autodiff writes it, against the tiled-transpose form the model uses (`ops/matmul.py: tn_dot`); plus the
transposes alone and the tied LM head's gradient. Best of 7 after a warm-up; run alone on an idle machine.

    python benchmarks/bench_cpu_weight_grad.py
    python benchmarks/bench_cpu_weight_grad.py --small    # N 256, D 64, F 128, V 1024, one repeat: a smoke run
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from softgrpo_jax.ops.matmul import tn_dot, transpose_tiled

F32 = jnp.float32


def best_of(fn, *args, n=7):
    j = jax.jit(fn)
    jax.block_until_ready(j(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(j(*args))
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny shapes, one repeat: a smoke run")
    args = ap.parse_args()
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    N, D, F, V = (256, 64, 128, 1024) if args.small else (4096, 576, 1536, 49152)
    best = functools.partial(best_of, n=1 if args.small else 7)
    x = jax.random.normal(k[0], (N, D), jnp.bfloat16)
    g = jax.random.normal(k[1], (N, F), jnp.bfloat16)
    w = jax.random.normal(k[2], (D, F), jnp.bfloat16)
    flops = 2 * N * D * F
    rows = [
        ("forward x @ W (reference)", best(lambda x, w: jnp.dot(x, w, preferred_element_type=F32), x, w), flops),
        ("weight grad, plain x.T @ g", best(lambda x, g: jnp.dot(x.T, g, preferred_element_type=F32), x, g), flops),
        ("weight grad, tiled transpose (tn_dot)", best(tn_dot, x, g), flops),
        (f"transpose [{N},{F}] bf16, plain", best(lambda a: a.T * 2, g), None),
        (f"transpose [{N},{F}] bf16, tiled", best(transpose_tiled, g), None),
    ]
    h = jax.random.normal(k[3], (N - 16, D), jnp.bfloat16)
    gl = jax.random.normal(k[1], (N - 16, V), jnp.bfloat16)
    rows.append(("tied LM head grad [V,D]: g.T @ h", best(tn_dot, gl, h), 2 * (N - 16) * D * V))
    rows.append(("tied LM head grad [V,D]: (h.T @ g).T", best(lambda h, g: transpose_tiled(tn_dot(h, g)), h, gl),
                 2 * (N - 16) * D * V))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}\n")
    print("| what | time (ms) | GFLOP/s |\n|---|---|---|")
    for name, t, fl in rows:
        print(f"| {name} | {t * 1e3:.2f} | {'' if fl is None else f'{fl / t / 1e9:.0f}'} |")


if __name__ == "__main__":
    main()
