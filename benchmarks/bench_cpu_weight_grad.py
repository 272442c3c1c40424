"""The bf16 weight-gradient GEMM on XLA:CPU: x.T @ g ([4096, 576] x [4096, 1536], SmolLM2's MLP at 16 x 256 tokens)
as plain autodiff writes it, against the tiled-transpose form `models/transformer.py` uses; plus the transposes
alone and the tied LM head's gradient. Best of 7 after a warm-up; run alone on an idle machine.

    python benchmarks/bench_cpu_weight_grad.py
"""

import time

import jax
import jax.numpy as jnp

from softgrpo_jax.models.transformer import _tn_dot, _transpose_tiled

F32 = jnp.float32


def best(fn, *args, n=7):
    j = jax.jit(fn)
    jax.block_until_ready(j(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(j(*args))
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    N, D, F, V = 4096, 576, 1536, 49152
    x = jax.random.normal(k[0], (N, D), jnp.bfloat16)
    g = jax.random.normal(k[1], (N, F), jnp.bfloat16)
    w = jax.random.normal(k[2], (D, F), jnp.bfloat16)
    flops = 2 * N * D * F
    rows = [
        ("forward x @ W (reference)", best(lambda x, w: jnp.dot(x, w, preferred_element_type=F32), x, w), flops),
        ("weight grad, plain x.T @ g", best(lambda x, g: jnp.dot(x.T, g, preferred_element_type=F32), x, g), flops),
        ("weight grad, tiled transpose (_tn_dot)", best(_tn_dot, x, g), flops),
        ("transpose [4096,1536] bf16, plain", best(lambda a: a.T * 2, g), None),
        ("transpose [4096,1536] bf16, tiled", best(_transpose_tiled, g), None),
    ]
    h = jax.random.normal(k[3], (N - 16, D), jnp.bfloat16)
    gl = jax.random.normal(k[1], (N - 16, V), jnp.bfloat16)
    rows.append(("tied LM head grad [V,D]: g.T @ h", best(_tn_dot, gl, h), 2 * (N - 16) * D * V))
    rows.append(("tied LM head grad [V,D]: (h.T @ g).T", best(lambda h, g: _transpose_tiled(_tn_dot(h, g)), h, gl),
                 2 * (N - 16) * D * V))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}\n")
    print("| what | time (ms) | GFLOP/s |\n|---|---|---|")
    for name, t, fl in rows:
        print(f"| {name} | {t * 1e3:.2f} | {'' if fl is None else f'{fl / t / 1e9:.0f}'} |")


if __name__ == "__main__":
    main()
