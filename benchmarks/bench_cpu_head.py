"""The vocabulary head of the discrete log-probs (``models/transformer.py: vocab_logprobs``) on XLA:CPU at
SmolLM2-135M's shape: 16 x 256 positions, all needed (a GRPO batch), D = 576, V = 49152, tied bf16 head. Forward
alone and forward + backward (gradients to the hidden states and the head weight), with the vocabulary in blocks
(``Tuning.vocab_block``, the default on single-device XLA:CPU) and as one block (the path of the other backends,
chunks of ~``Tuning.vocab_chunk_bytes`` of float32 logits), side by side in one process; best of 5 after a warm-up,
and the largest differences between the two (they sum in different orders).

    python benchmarks/bench_cpu_head.py
    python benchmarks/bench_cpu_head.py --small    # 2 x 64 positions, V 8192, one repeat: a smoke run
"""

import argparse

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true",
                    help="2 x 64 positions, D 64, V 8192 (still several vocabulary blocks), one repeat: a smoke run")
    args = ap.parse_args()
    B, L, D, V, repeats = (2, 64, 64, 8192, 1) if args.small else (16, 256, 576, 49152, 5)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from softgrpo_jax.models import ModelConfig
    from softgrpo_jax.models import transformer as T
    from softgrpo_jax.ops.tuning import tuning, use_tuning
    from softgrpo_jax.ops.vocab_logprobs import vocab_block, vocab_chunk_rows

    cfg = ModelConfig(family="llama", vocab_size=V, hidden_size=D, intermediate_size=1536, num_layers=1,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True, dtype="bfloat16")
    rng = np.random.RandomState(0)
    params = {"embed": jnp.asarray(rng.randn(cfg.vocab_size, cfg.hidden_size) * 0.05, jnp.float32)}
    h = jnp.asarray(rng.randn(B, L, cfg.hidden_size), jnp.bfloat16)
    tgt = jnp.asarray(rng.randint(0, cfg.vocab_size, (B, L)))
    need = jnp.ones((B, L), bool)
    coef = jnp.asarray(rng.randn(B, L), jnp.float32)

    def timed(f):
        out = jax.block_until_ready(f(params, h))
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(params, h))
            ts.append(time.perf_counter() - t)
        return 1e3 * min(ts), out

    res, default = {}, tuning().vocab_block
    mb = tuning().vocab_chunk_bytes // 2**20
    for name, block in ((f"one block (rows of ~{mb} MB of logits)", None), ("blocks (Tuning.vocab_block)", default)):
        with use_tuning(vocab_block=block):  # read while tracing: each jit below traces under its own setting
            rows, cols = vocab_chunk_rows(cfg.vocab_size), vocab_block(cfg.vocab_size)

            def fwd(p, h):  # a fresh function per setting (jit caches traces by function)
                return T.vocab_logprobs(cfg, p, h, tgt, need)

            def fwd_bwd(p, h):
                return jax.value_and_grad(lambda p, h: jnp.sum(coef * fwd(p, h)), argnums=(0, 1))(p, h)

            res[name] = (rows, cols) + timed(jax.jit(fwd)) + timed(jax.jit(fwd_bwd))
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; {B * L} positions, D {D}, V {V}, bf16\n")
    print("| head | rows x columns per block | forward ms | forward + backward ms |")
    print("|---|---|---|---|")
    for name, (rows, cols, t_f, _, t_fb, _) in res.items():
        print(f"| {name} | {rows} x {cols} | {t_f:.0f} | {t_fb:.0f} |")
    (_, _, t1, lp1, tb1, g1), (_, _, t2, lp2, tb2, g2) = res.values()
    print(f"\nblocks vs one block: forward {t1 / t2:.2f}x, forward + backward {tb1 / tb2:.2f}x")
    d_lp = np.abs(np.asarray(lp1) - np.asarray(lp2)).max()
    dw1, dw2 = np.asarray(g1[1][0]["embed"]), np.asarray(g2[1][0]["embed"])
    dh1, dh2 = (np.asarray(g[1][1], np.float32) for g in (g1, g2))
    print(f"max |difference|: log-probs {d_lp:.1e}, head gradient {np.abs(dw1 - dw2).max() / np.abs(dw1).max():.1e}"
          f" (relative), hidden-state gradient {np.abs(dh1 - dh2).max() / np.abs(dh1).max():.1e} (relative)")


if __name__ == "__main__":
    main()
