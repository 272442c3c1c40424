"""CPU A/B of the SofT-GRPO update (SmolLM2-135M, bf16 compute, float32 master weights): "new" is the current
code; "old" is either the same code with two of its XLA:CPU choices switched off through ``ops.tuning`` (bf16 scan
residuals instead of uint16 bits: ``Tuning.residuals_as_bits=False``; untiled attention: ``Tuning.attention_tiles``
one tile of all rows and positions), or, with ``--against REV``, the code of git revision REV (checked out into a
temporary worktree and imported from there; the "old" run then uses only names every revision since the trainer
has: ``load_pretrained``, ``config``, ``rl.trainer``). Variants alternate, each run in a fresh subprocess (best of
``--repeats`` updates after a compiling one), so machine drift hits both alike.

    python benchmarks/bench_cpu_update_ab.py [--batch 16 --len 256 --micro 1 --pairs 2] [--no-remat]
    python benchmarks/bench_cpu_update_ab.py --small    # tiny random model, 2 x 128 tokens, one pair: a smoke run
    python benchmarks/bench_cpu_update_ab.py --against 20ef333   # this checkout against an older commit
    python benchmarks/bench_cpu_update_ab.py --against 708ced8 --grpo   # the GRPO update (discrete tokens)
    python benchmarks/bench_cpu_update_ab.py --gemm   # isolated bf16 GEMMs: XLA:CPU against torch
    python benchmarks/bench_cpu_update_ab.py --mlp    # the MLP stack alone: plain against token tiles
    python benchmarks/bench_cpu_update_ab.py --optimizer   # clip + AdamW alone: optax's clip against ours

``--gemm``, ``--mlp`` and ``--optimizer`` combine (one table after another); ``--small`` shrinks each of these runs
to seconds. The demo's update is ``--batch 32 --len 192 --micro 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# a run under --against imports this file and bench_cpu_decode_train with an old revision's package: their
# module-level imports stay within jax, numpy and flax
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_decode_train import cpu_name, train_batch  # noqa: E402


def best(fn, args, repeats):
    """Best wall time of ``fn(*args)`` over ``repeats`` calls after a warm-up one."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def tiny_model(remat):
    """A random SmolLM2-like model small enough to compile in seconds (--small): float32 weights, bf16 compute,
    dims multiples of 8 so that the XLA:CPU tiled paths apply as at SmolLM2's shape."""
    from flax import nnx

    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, param_dtype="float32",
                      dtype="bfloat16", remat=remat)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def one_run(variant, B, L, micro, remat, repeats, src=None, grpo=False, small=False):
    import softgrpo_jax
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.config import base_config, loss_config
    from softgrpo_jax.rl.trainer import PolicyState, make_optimizer, split_micro

    if src:  # --against: the old revision's package must be the one imported
        here = os.path.realpath(os.path.dirname(softgrpo_jax.__file__))
        if not here.startswith(os.path.realpath(src) + os.sep):
            raise SystemExit(f"expected softgrpo_jax from {src}, imported {here}")
    elif variant == "old":
        from softgrpo_jax.ops.tuning import set_tuning

        # one attention tile: all rows of a micro-batch, all L positions (the tiles must divide the batch and length)
        set_tuning(residuals_as_bits=False, attention_tiles=(B // micro, L))
    model = tiny_model(remat) if small else load_pretrained("smollm2", compute_dtype="bfloat16", remat=remat)
    pol = PolicyState(model, make_optimizer(1e-6), loss_config(base_config().rl), None)
    batch = pol.put(split_micro(train_batch(B, L, 5, model.config.vocab_size, not grpo), micro))
    old = pol.logprobs(pol.params, batch)
    jax.block_until_ready(pol.update(batch, old, old))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(pol.update(batch, old, old))
        times.append(time.perf_counter() - t)
    return times


def gemm_table(small=False):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    repeats = 1 if small else 7
    shapes = ((256, 64, 128), (256, 128, 64)) if small else ((4096, 576, 1536), (4096, 1536, 576), (4096, 576, 49152))
    print("| GEMM (bf16 operands) | XLA:CPU, float32 result | XLA:CPU, bf16 result | torch, bf16 result |")
    print("|---|---|---|---|")
    for m, k, n in shapes:
        r = np.random.RandomState(0)
        a, b = r.randn(m, k).astype(np.float32), r.randn(k, n).astype(np.float32)
        ja, jb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        f32 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        b16 = jax.jit(lambda x, y: x @ y)
        ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
        torch_s = min(_timed(lambda: ta @ tb) for _ in range(repeats))
        gf = lambda s: f"{2 * m * k * n / s / 1e9:,.0f} GFLOP/s"  # noqa: E731
        print(f"| [{m}, {k}] x [{k}, {n}] | {gf(best(f32, (ja, jb), repeats))} | {gf(best(b16, (ja, jb), repeats))} | "
              f"{gf(torch_s)} |")


def mlp_table(n=4096, d=576, f=1536, layers=30, tiles=(256, 512, 1024), repeats=5):
    """SmolLM2's MLP stack alone (a scan over 30 rematerialised layers, bf16 compute, float32 weights), forward and
    forward + backward, plain (three ``ops.matmul.dense`` and ``ops.mlp.swiglu``) against ``ops.mlp.swiglu_mlp`` over
    token tiles."""
    from softgrpo_jax.ops.matmul import dense
    from softgrpo_jax.ops.mlp import swiglu, swiglu_mlp

    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(n, d), jnp.bfloat16)
    ws = tuple(jnp.asarray(r.randn(layers, *s) * 0.02, jnp.float32) for s in ((d, f), (d, f), (f, d)))

    def stack(rows):
        def layer(h, w):
            if rows:
                return h + swiglu_mlp(h, *w, rows), None
            return h + dense(swiglu(dense(h, w[0]), dense(h, w[1])), w[2]), None

        return lambda x, ws: jax.lax.scan(jax.checkpoint(layer), x, ws)[0]  # remat, as the demo's model

    flop = layers * 3 * 2 * n * d * f
    print(f"| MLP stack ({layers} layers, [{n}, {d}] tokens, F {f}) | forward ms | GFLOP/s | fwd + bwd ms | GFLOP/s |")
    print("|---|---|---|---|---|")
    for rows in (0,) + tuple(tiles):
        fn = stack(rows)
        fwd = best(jax.jit(fn), (x, ws), repeats)
        bwd = best(jax.jit(jax.grad(lambda x, ws: fn(x, ws).astype(jnp.float32).sum(), argnums=(0, 1))), (x, ws),
                   repeats)
        name = f"tiles of {rows} tokens" if rows else "plain"
        print(f"| {name} | {fwd * 1e3:.0f} | {flop / fwd / 1e9:,.0f} | {bwd * 1e3:.0f} | "
              f"{3 * flop / bwd / 1e9:,.0f} |", flush=True)


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def optimizer_table(repeats: int = 7, small: bool = False):
    """The update's optimizer step alone on SmolLM2's 135M float32 parameters (``small``: the tiny model's; random
    gradients whose norm triggers the clip), under the update's skip conditional, params and state donated:
    ``optax.clip_by_global_norm`` + ``optax.adamw`` against ``make_optimizer`` (``rl.trainer.clip_by_global_norm``,
    given the norm the update computes anyway); alternating calls, best of ``repeats``."""
    import optax
    from flax import nnx

    from softgrpo_jax import load_pretrained
    from softgrpo_jax.rl.trainer import make_optimizer

    _, params = nnx.split(tiny_model(False) if small else load_pretrained("smollm2"))
    leaves, tdef = jax.tree.flatten(params)
    key = jax.random.key(0)
    scale = 1e-2 if small else 1e-3  # a gradient norm above the clip (1) either way
    grads = jax.tree.unflatten(tdef, [jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * scale
                                      for i, x in enumerate(leaves)])
    txs = {"optax clip_by_global_norm + adamw": (optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
               optax.constant_schedule(1e-6), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)), False),
           "make_optimizer (clip given the norm) + adamw": (make_optimizer(1e-6), True)}

    def make(tx, given):
        def step(p, o, g):
            n = optax.tree.norm(g)

            def take(_):
                u, o2 = tx.update(g, o, p, grad_norm=n) if given else tx.update(g, o, p)
                return optax.apply_updates(p, u), o2

            return jax.lax.cond(jnp.isfinite(n), take, lambda _: (p, o), None)

        return jax.jit(step, donate_argnums=(0, 1))

    fns = {k: make(tx, given) for k, (tx, given) in txs.items()}
    state = {k: (jax.tree.map(jnp.copy, params), txs[k][0].init(params)) for k in fns}
    for k, f in fns.items():  # compile, and one step from the same start for the comparison
        state[k] = jax.block_until_ready(f(*state[k], grads))
    a, b = (jax.tree.leaves(state[k][0]) for k in fns)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    step = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, jax.tree.leaves(params)))
    print(f"gradient norm {float(optax.tree.norm(grads)):.2f} (clipped to 1); after one step the two parameter sets "
          f"differ by at most {diff:.2e} (the step itself moved them up to {step:.2e})\n")
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            state[k] = jax.block_until_ready(f(*state[k], grads))
            times[k].append(time.perf_counter() - t)
    n_params = sum(x.size for x in leaves)
    print(f"| clip + AdamW ({n_params / 1e6:.3g}M float32 parameters) | best (s) | all (s) |")
    print("|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {min(ts):.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    ka, kb = list(times)
    print(f"\n{ka} / {kb}: {min(times[ka]) / min(times[kb]):.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per update")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--grpo", action="store_true", help="the GRPO update (discrete tokens) instead of SofT-GRPO's")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm", action="store_true")
    ap.add_argument("--mlp", action="store_true", help="the MLP stack alone: plain against token tiles")
    ap.add_argument("--optimizer", action="store_true", help="clip + AdamW alone: optax's clip against ours")
    ap.add_argument("--against", metavar="REV", help="old = the code of this git revision")
    ap.add_argument("--small", action="store_true",
                    help="a smoke run: a tiny random model, 2 x 128 tokens, one pair, one repeat; tiny --gemm / "
                    "--mlp shapes, --optimizer on the tiny model")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one run, print JSON
    ap.add_argument("--src", help=argparse.SUPPRESS)  # internal: the worktree an "old" run imports from
    args = ap.parse_args()
    if args.small and not args.variant:  # (the per-variant subprocesses get the sizes explicitly)
        args.batch, args.len, args.micro, args.pairs, args.repeats = 2, 128, 1, 1, 1
    remat = not args.no_remat
    if args.variant:
        print(json.dumps(one_run(args.variant, args.batch, args.len, args.micro, remat, args.repeats, args.src,
                                 args.grpo, args.small)))
        return
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}")
    if args.gemm or args.mlp or args.optimizer:  # the isolated tables asked for, one after another
        if args.gemm:
            gemm_table(args.small)
            print()
        if args.mlp:
            mlp_table(**(dict(n=256, d=64, f=128, layers=2, tiles=(128,), repeats=1) if args.small else {}))
            print()
        if args.optimizer:
            optimizer_table(1 if args.small else 7, args.small)
        return
    env_old, wt = None, None
    if args.against:
        import atexit
        import tempfile

        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        wt = os.path.join(tempfile.mkdtemp(prefix="softgrpo-ab-"), "old")
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "-q", wt, args.against], check=True)
        import shutil

        atexit.register(shutil.rmtree, os.path.dirname(wt), ignore_errors=True)  # runs after the removal below
        atexit.register(subprocess.run, ["git", "-C", repo, "worktree", "remove", "--force", wt])
        env_old = dict(os.environ, PYTHONPATH=wt + os.pathsep + os.environ.get("PYTHONPATH", ""))
        rev = subprocess.run(["git", "-C", wt, "log", "-1", "--format=%h %s"], check=True, stdout=subprocess.PIPE,
                             text=True).stdout.strip()
        print(f"old = {rev[:100]}\n")
    print(f"{'GRPO' if args.grpo else 'SofT-GRPO'} update of {args.batch} x {args.len} tokens in {args.micro} "
          f"micro-batch(es){' (--small: a tiny random model)' if args.small else ''}, bf16 compute, "
          f"remat {remat}; best of {args.repeats} per run\n")
    print("| run | variant | best (s) | all (s) |")
    print("|---|---|---|---|")
    res = {"new": [], "old": []}
    for i in range(args.pairs):
        for variant in ("new", "old"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--batch", str(args.batch),
                   "--len", str(args.len), "--micro", str(args.micro), "--repeats", str(args.repeats)]
            if not remat:
                cmd.append("--no-remat")
            if args.grpo:
                cmd.append("--grpo")
            if args.small:
                cmd.append("--small")
            if variant == "old" and wt:
                cmd += ["--src", wt]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                                 env=env_old if variant == "old" else None).stdout
            times = json.loads(out.strip().splitlines()[-1])
            res[variant].append(min(times))
            print(f"| {i + 1} | {variant} | {min(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |", flush=True)
    new, old = min(res["new"]), min(res["old"])
    print(f"\nbest new {new:.2f} s, best old {old:.2f} s: old / new = {old / new:.3f}")


if __name__ == "__main__":
    main()
