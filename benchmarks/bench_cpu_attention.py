"""CPU micro-benchmark, side by side in one run: one layer's attention and RoPE, forward + backward, at SmolLM2's
training shape (16 x 256 tokens, 9 query / 3 KV heads, head dim 64, bf16), the simpler paths against the current ones.

attention: autodiff of the batched-GEMM attention with plain key/value transposes against ``ops.attention.
           attention_core`` (written-out backward, ``heads_major`` transposes) untiled, tiled by batch rows, and
           tiled by batch rows and causal query tiles (the current code); the element types of every compiled dot
           are printed (float32 operands = XLA:CPU converted the dot).
rope:      the query rotation computed in bf16 (rounded after every op, the previous code) against float32
           rounded once (``apply_rope``, the current code), forward + backward.
block:     a layer's whole attention from its normed input (D 576; q / k / v projections, RoPE, attention):
           the plain path (``dense`` x 3, ``apply_rope``, ``attention_core``) against ``ops.attention_block.
           attention_block`` (one custom VJP over batch-row tiles, the backward recomputing projections and softmax
           weights from the input and the saved output + log-sum-exp), forward alone and forward + backward. Under
           remat the update runs the plain path's forward twice (forward, then recomputed for the backward) and the
           block's once: the saved output and log-sum-exp let the recomputed layer skip it.

    python benchmarks/bench_cpu_attention.py [--repeats 7]
    python benchmarks/bench_cpu_attention.py --small    # tiny shapes, one repeat: a smoke run, not a measurement

Single-op timings on XLA:CPU include page-faulting each call's fresh output buffers; benchmarks/RESULTS.md quotes
the whole update too.
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from softgrpo_jax.models import ModelConfig  # noqa: E402
from softgrpo_jax.models.transformer import inv_frequencies  # noqa: E402
from softgrpo_jax.ops.attention import (attention_core, attention_probs_out, group_queries, heads_major,  # noqa: E402
                                        ungroup_queries)
from softgrpo_jax.ops.attention_block import attention_block  # noqa: E402
from softgrpo_jax.ops.matmul import dense  # noqa: E402
from softgrpo_jax.ops.rope import apply_rope  # noqa: E402
from softgrpo_jax.ops.tuning import use_tuning  # noqa: E402

B, TOK, H, HKV, HD, D = 16, 256, 9, 3, 64, 576  # --small: see main
G = H // HKV


def best(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def dot_types(fn, args):
    hlo = fn.lower(*args).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return sorted({"x".join(types.get(o, "?") for o in ops)
                   for ops in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)})


def attention_fn(variant: str):
    """variant: "autodiff", "core" (``attention_core``; untiled when run under ``Tuning.attention_tiles`` (B, T)),
    "batch" (tiled by batch rows), "causal" (batch rows and causal query tiles: the current code)."""
    mask = jnp.tril(jnp.ones((TOK, TOK), bool))[None].repeat(B, 0)
    scale = HD ** -0.5

    def attn(q, k, v):
        qg = q.reshape(B, TOK, HKV, G, HD).transpose(0, 2, 3, 1, 4).reshape(B, HKV, G * TOK, HD)
        if variant == "autodiff":
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            o = attention_probs_out(qg, kt, vt, mask, scale)[1].astype(q.dtype)
        else:
            o = attention_core(qg, heads_major(k), heads_major(v), mask, scale, False, variant == "causal")
        return o.reshape(B, HKV, G, TOK, HD).transpose(0, 3, 1, 2, 4).reshape(B, TOK, H * HD)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o,) + vjp(do.astype(o.dtype))

    return jax.jit(fwd_bwd)


def block_fn(variant: str, cos, sin, backward: bool):
    """variant: "plain" (projections, RoPE and ``attention_core``, the layer's path without the fused block) or
    "block" (``attention_block``); h [B, T, D] bf16, float32 weights as the trainer holds them."""
    mask = jnp.tril(jnp.ones((TOK, TOK), bool))[None].repeat(B, 0)
    scale = HD ** -0.5

    def plain(h, wq, wk, wv):
        q = apply_rope(dense(h, wq).reshape(B, TOK, H, HD), cos, sin)
        k = apply_rope(dense(h, wk).reshape(B, TOK, HKV, HD), cos, sin)
        v = dense(h, wv).reshape(B, TOK, HKV, HD)
        o = attention_core(group_queries(q, HKV), heads_major(k), heads_major(v), mask, scale, False, True)
        return ungroup_queries(o, TOK).reshape(B, TOK, H * HD)

    def block(h, wq, wk, wv):
        return attention_block(h, wq, wk, wv, None, None, None, cos, sin, mask, (H, HKV, HD, scale, False))

    f = plain if variant == "plain" else block
    if not backward:
        return jax.jit(lambda h, wq, wk, wv, do: f(h, wq, wk, wv))

    def fwd_bwd(h, wq, wk, wv, do):
        o, vjp = jax.vjp(f, h, wq, wk, wv)
        return (o,) + vjp(do.astype(o.dtype))

    return jax.jit(fwd_bwd)


def rope_bf16(x, cos, sin):  # the previous apply_rope: every product rounded to x's dtype
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :].astype(x.dtype) + rot * sin[:, :, None, :].astype(x.dtype)


def rope_fn(rope):
    def fwd_bwd(x, cos, sin, ct):
        y, vjp = jax.vjp(lambda x: rope(x, cos, sin), x)
        return y, vjp(ct)[0]

    return jax.jit(fwd_bwd)


def main():
    global B, TOK, D
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="tiny shapes (B 2, T 128, D 64), one repeat: a smoke run")
    args = ap.parse_args()
    if args.small:  # T 128: the smallest T that still takes causal query tiles (ops.attention.attention_tiles)
        B, TOK, D, args.repeats = 2, 128, 64, 1
    r = np.random.RandomState(0)
    bf = jnp.bfloat16
    q = jnp.asarray(r.randn(B, TOK, H, HD), bf)
    k, v = (jnp.asarray(r.randn(B, TOK, HKV, HD), bf) for _ in range(2))
    do = jnp.asarray(r.randn(B, TOK, H * HD), jnp.float32)
    print(f"Machine: {os.cpu_count()} cores, jax {jax.__version__}; B {B}, T {TOK}, heads {H}/{HKV}, hd {HD}, bf16\n")
    print("| what | variant | ms (best of %d) | dot operand types |" % args.repeats)
    print("|---|---|---|---|")
    outs = {}
    variants = (("autodiff", "autodiff, plain transposes"),
                ("core", "`attention_core`, untiled"),
                ("batch", "`attention_core`, tiles of batch rows"),
                ("causal", "`attention_core`, batch rows + causal query tiles (current)"))
    for variant, name in variants:
        # "core": one tile of all B rows and T positions, whatever attention_tiles would pick
        with use_tuning(attention_tiles=(B, TOK) if variant == "core" else None):
            fn = attention_fn(variant)
            outs[variant] = fn(q, k, v, do)
            ms = 1e3 * best(fn, (q, k, v, do), args.repeats)
            print(f"| attention fwd+bwd | {name} | {ms:.1f} | {', '.join(dot_types(fn, (q, k, v, do)))} |")
    f32 = jnp.float32

    def rel(x, y):
        return max(float(jnp.abs(a.astype(f32) - b.astype(f32)).max() / jnp.abs(a.astype(f32)).max())
                   for a, b in zip(x, y))

    pos = jnp.arange(TOK, dtype=jnp.float32)[None, :, None] * jnp.ones((B, 1, 1))
    freq = pos * inv_frequencies(ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                                             num_layers=1, num_heads=1, num_kv_heads=1, head_dim=HD))
    emb = jnp.concatenate([freq, freq], -1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    ct = jnp.asarray(r.randn(B, TOK, H, HD), bf)
    for rope, name in ((rope_bf16, "bf16, rounded per op (previous)"),
                       (apply_rope, "float32, rounded once (current)")):
        fn = rope_fn(rope)
        print(f"| query RoPE fwd+bwd | {name} | {1e3 * best(fn, (q, cos, sin, ct), args.repeats):.1f} |  |")
    h = jnp.asarray(r.randn(B, TOK, D), bf)
    ws = [jnp.asarray(r.randn(D, n * HD) / np.sqrt(D), f32) for n in (H, HKV, HKV)]
    blocks = {}
    for backward in (False, True):
        for variant, name in (("plain", "projections + RoPE + `attention_core`"),
                              ("block", "`attention_block` (current)")):
            fn = block_fn(variant, cos, sin, backward)
            args_b = (h, *ws, do)
            blocks[(variant, backward)] = fn(*args_b)
            what = "attention block fwd+bwd" if backward else "attention block fwd"
            print(f"| {what} | {name} | {1e3 * best(fn, args_b, args.repeats):.1f} | "
                  f"{', '.join(dot_types(fn, args_b))} |")
    print(f"\nattention block, output and gradients (h, Wq, Wk, Wv), max relative difference of the block to the "
          f"plain path: {rel(blocks[('block', True)], blocks[('plain', True)]):.1e} (bf16 rounding; the outputs "
          f"alone: {rel((blocks[('block', False)],), (blocks[('plain', False)],)):.1e})")
    print(f"attention output and gradients, max relative difference to the untiled core: autodiff "
          f"{rel(outs['autodiff'], outs['core']):.1e} (bf16 rounding), batch tiles {rel(outs['batch'], outs['core']):.1e}, "
          f"causal tiles {rel(outs['causal'], outs['core']):.1e}")


if __name__ == "__main__":
    main()
