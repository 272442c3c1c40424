"""One SofT-GRPO update over rows of RL-like lengths: fixed-row micro-batches (every row padded to the prompt bucket
plus the longest response's bucket, ``rl.micro_batch_size`` rows each) against token-budget micro-batches
(``rl.max_tokens_per_micro_batch``: rows grouped by length, each micro-batch padded to its own bucket), same rows,
same weights, in the same run.

    python benchmarks/bench_train_scale.py                    # CPU: SmolLM2 shape cut to 6 layers, 32 rows, budget 1024
    python benchmarks/bench_train_scale.py --small            # smoke run, seconds
    PYTHONPATH=. python benchmarks/bench_train_scale.py --gpu # one GPU: Qwen2.5-1.5B shape (see --help), < 8 min

Rows: prompts uniform in [prompt/2, prompt] tokens, responses lognormal with median 3/8 of the budget and sigma 0.6,
capped at the budget (a few rows always reach it), the first 85% of each response soft (thinking), the rest discrete.
Printed per variant: real tokens per second of the update (second and later calls), the share of processed token
slots that are padding, compile time, the number of compiled shapes, and peak memory (the largest compiled
program's temporaries on CPU; the device's peak bytes in use on a GPU). On a GPU also the model FLOPs utilisation
of the real tokens (6 x non-embedding parameters x tokens + causal attention) against the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bench_gpu_common as C  # noqa: E402  (puts the repository on sys.path; no GPU memory preallocation)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from softgrpo_jax.rl.batching import (gather_micro_batches, padding_fraction, plan_micro_batches,  # noqa: E402
                                      row_lengths)
from softgrpo_jax.rl.objective import LossConfig, loss_denominator  # noqa: E402
from softgrpo_jax.rl.trainer import (PolicyState, UpdateSettings, make_accumulate_fn, make_optimizer,  # noqa: E402
                                     make_update_fn, split_micro, token_budget_groups)

SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=8192)
# dense bf16 peak FLOP/s per card (no sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_rows(B: int, prompt: int, budget: int, V: int, K: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A trainer batch as ``rollout_to_batch`` lays it out: left-padded prompts, right-padded responses."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(prompt // 2, prompt + 1, B)
    rlen = np.minimum(np.exp(rng.normal(np.log(budget * 3 / 8), 0.6, B)).astype(int), budget)
    rlen[rng.choice(B, max(1, B // 16), replace=False)] = budget  # a few rows reach the budget
    rlen = np.maximum(rlen, 1)
    L = int(rlen.max())
    T = prompt + L
    mask = np.zeros((B, T), bool)
    loss = np.zeros((B, T), bool)
    soft = np.zeros((B, T), bool)
    for b in range(B):
        mask[b, prompt - plen[b]:prompt + rlen[b]] = True
        loss[b, prompt:prompt + rlen[b]] = True
        soft[b, prompt:prompt + int(0.85 * rlen[b])] = True
    tokens = np.where(mask, rng.integers(1, V, (B, T)), 0).astype(np.int32)
    ids = np.zeros((B, T, K), np.int32)
    ids[..., 0] = tokens
    ids[soft, 1:] = rng.integers(1, V, (int(soft.sum()), K - 1))
    ytil = np.where(soft[..., None], np.log(rng.dirichlet(np.ones(K), (B, T)) + 1e-6)
                    + rng.gumbel(size=(B, T, K)).clip(-1.5, 3), 0.0).astype(np.float32)
    return dict(tokens=tokens, attention_mask=mask, topk_ids=ids, topk_ytil=ytil, soft_mask=soft, loss_mask=loss,
                advantages=rng.standard_normal(B).astype(np.float32), tau=np.full(B, 0.1, np.float32))


def peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - CPU: no allocator statistics
        return None


def run_variant(model, batch, *, token_budget: int, micro_rows: int, repeats: int):
    """Time ``repeats`` updates (after a first, compiling call) of one mini-batch: fixed rows (``token_budget`` 0)
    or token-budget micro-batches. Returns a dict of measurements."""
    graphdef, params = nnx.split(model)
    pol = PolicyState(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), make_optimizer(1e-6),
                      LossConfig(chunk_size=1024), None)
    real = int(batch["attention_mask"].sum())
    if token_budget:
        plans = plan_micro_batches(row_lengths(batch), token_budget)
        groups = [pol.put(gather_micro_batches(batch, p)) for p in plans]
        lps = [C.block(pol.logprobs(pol.params, g)) for g in groups]
        args = [(g, lp, lp) for g, lp in zip(groups, lps)]
        den = loss_denominator(jnp.asarray(batch["loss_mask"]), pol.loss_cfg)
        pad = padding_fraction(plans, row_lengths(batch))
        shapes = len(plans)

        def update():
            return pol.update_groups(args, den)
    else:
        B = batch["tokens"].shape[0]
        mb = pol.put(split_micro(batch, B // micro_rows))
        lp = C.block(pol.logprobs(pol.params, mb))
        pad = 1.0 - real / batch["attention_mask"].size
        shapes = 1

        def update():
            return pol.update(mb, lp, lp)
    t0 = time.perf_counter()
    m = C.block(update())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = C.block(update())
        times.append(time.perf_counter() - t0)
    m = jax.device_get(m)
    return dict(time_s=min(times), compile_s=compile_s, real_tokens=real, padding=pad, shapes=shapes,
                grad_norm=float(m["grad_norm"]), finite=bool(np.isfinite(m["grad_norm"])), peak=peak_bytes())


def temp_bytes(model, batch, *, token_budget: int, micro_rows: int) -> int:
    """CPU stand-in for peak memory: the largest temporaries of the compiled update programs (XLA's memory
    analysis of each micro-batch shape's program)."""
    graphdef, params = nnx.split(model)
    cfg = LossConfig(chunk_size=1024)
    tx = make_optimizer(1e-6)
    opt = tx.init(params)
    if token_budget:
        fn = make_accumulate_fn(graphdef, cfg)
        out = 0
        for g in token_budget_groups(batch, token_budget):
            g = jax.tree.map(jnp.asarray, g)
            lp = jnp.zeros(g["tokens"].shape, jnp.float32)
            mem = fn.lower(params, g, lp, lp, jnp.float32(1.0)).compile().memory_analysis()
            out = max(out, mem.temp_size_in_bytes)
        return out
    B = batch["tokens"].shape[0]
    mb = jax.tree.map(jnp.asarray, split_micro(batch, B // micro_rows))
    lp = jnp.zeros(mb["tokens"].shape, jnp.float32)
    fn = make_update_fn(graphdef, tx, UpdateSettings(cfg, B // micro_rows))
    return fn.lower(params, opt, mb, lp, lp).compile().memory_analysis().temp_size_in_bytes


def model_flops(cfg, lengths) -> float:
    """Training FLOPs of one forward + backward over rows of the given real lengths."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = L * (D * (q + 2 * kv) + q * D + 3 * D * F) + D * cfg.vocab_size
    attn = sum(6.0 * L * q * n * n for n in lengths)  # causal: QK^T and PV, half the square, x3 forward+backward
    return 6.0 * per_token * float(np.sum(lengths)) + attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model and few rows: a smoke run")
    ap.add_argument("--gpu", action="store_true", help="the GPU setting (Qwen2.5-1.5B shape, bf16)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None, help="prompt bucket (tokens)")
    ap.add_argument("--budget", type=int, default=None, help="response budget (tokens)")
    ap.add_argument("--micro-rows", type=int, default=None, help="rows per fixed-row micro-batch")
    ap.add_argument("--max-tokens", type=int, default=None, help="token budget per token-budget micro-batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = ap.parse_args()
    if args.small:
        shape, dtype, d = C.TINY, "float32", dict(rows=8, prompt=32, budget=96, micro_rows=4, max_tokens=256)
    elif args.gpu:
        shape, dtype, d = C.QWEN_1P5B, "bfloat16", dict(rows=32, prompt=1024, budget=8192, micro_rows=2,
                                                        max_tokens=16384)
    else:
        shape, dtype, d = dict(SMOLLM2, num_layers=6), "float32", dict(rows=32, prompt=128, budget=1024, micro_rows=4,
                                                                      max_tokens=4096)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.rows % args.micro_rows:
        ap.error(f"--rows {args.rows} must be a multiple of --micro-rows {args.micro_rows}")
    print(f"# {C.machine_line()}")
    model = C.make_model(shape, dtype, remat=args.gpu)
    batch = make_rows(args.rows, args.prompt, args.budget, shape["vocab_size"], seed=args.seed)
    lens = row_lengths(batch)
    print(f"# model {shape['family']} D={shape['hidden_size']} L={shape['num_layers']} {dtype}; {args.rows} rows, "
          f"prompt <= {args.prompt}, responses lognormal (median {args.budget * 3 // 8}, sigma 0.6, cap "
          f"{args.budget}); real tokens {int(lens.sum())}, longest row {int(lens.max())}; fixed rows: "
          f"{args.micro_rows} per micro-batch; token budget: {args.max_tokens} per micro-batch", flush=True)
    res = {}
    for name, budget in (("fixed rows", 0), ("token budget", args.max_tokens)):
        r = run_variant(model, batch, token_budget=budget, micro_rows=args.micro_rows, repeats=args.repeats)
        if r["peak"] is None:
            r["temp"] = temp_bytes(model, batch, token_budget=budget, micro_rows=args.micro_rows)
        res[name] = r
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None) if args.gpu else None
    lines = [f"{C.machine_line()}", "", "| variant | update s | real tokens/s | padding | shapes | compile s | "
             "peak memory | MFU | grad norm |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        mem = r["peak"] if r["peak"] is not None else r["temp"]
        mem_s = f"{mem / 2**30:.2f} GiB" + ("" if r["peak"] is not None else " (temp)")
        mfu = f"{model_flops(model.config, lens) / r['time_s'] / peak:.0%}" if peak else "-"
        lines.append(f"| {name} | {r['time_s']:.3f} | {r['real_tokens'] / r['time_s']:,.0f} | {r['padding']:.1%} | "
                     f"{r['shapes']} | {r['compile_s']:.1f} | {mem_s} | {mfu} | {r['grad_norm']:.4g} |")
    a, b = res["fixed rows"], res["token budget"]
    ratio = (b["real_tokens"] / b["time_s"]) / (a["real_tokens"] / a["time_s"])
    lines += ["", f"token budget / fixed rows, real tokens per second: {ratio:.2f}x; padding {a['padding']:.1%} -> "
              f"{b['padding']:.1%}"]
    same = abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * abs(a["grad_norm"]) + 1e-6
    ok = same and a["finite"] and b["finite"]
    lines.append(f"check: both finite {a['finite'] and b['finite']}; the same gradient norm after the same updates "
                 f"({a['grad_norm']:.6g} vs {b['grad_norm']:.6g}): {'ok' if same else 'DIFFERENT'}")
    return C.emit_report("\n".join(lines), args.out, ok)


if __name__ == "__main__":
    raise SystemExit(main())
