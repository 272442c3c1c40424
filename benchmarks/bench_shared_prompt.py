"""One SofT-GRPO update and log-prob pass with each row's prompt in the row against shared prompts
(``rl.share_prompt``: each distinct prompt of a token-budget micro-batch computed once, its rows continuing it),
same rows, same weights, in the same run.

    python benchmarks/bench_shared_prompt.py                  # SmolLM2-135M shape, bf16 + remat, prompts <= 96
    python benchmarks/bench_shared_prompt.py --prompt 512     # prompts <= 512: where sharing pays
    python benchmarks/bench_shared_prompt.py --small          # smoke run, seconds

Rows: ``--groups`` prompts x ``--n`` rows each, prompts uniform in [prompt/2, prompt] tokens, responses lognormal
(median 3/8 of ``--budget``, sigma 0.6, capped), as ``bench_train_scale.py`` makes them. Both sides are
token-budget micro-batches of ``--max-tokens``; the shared side is planned as the trainer plans it when shared
prompts are chosen. Printed: the processed token slots, the update and log-prob pass times (best of the repeats
after a compiling call), compile time and the gradient norm of each (the same loss: they must agree).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bench_gpu_common as C  # noqa: E402  (puts the repository on sys.path; no GPU memory preallocation)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_train_scale import SMOLLM2, make_rows  # noqa: E402
from softgrpo_jax.rl.batching import (gather_prefix_micro_batches, plan_prefix_micro_batches,  # noqa: E402
                                      prompt_ids)
from softgrpo_jax.rl.objective import LossConfig, loss_denominator  # noqa: E402
from softgrpo_jax.rl.trainer import PolicyState, make_optimizer, processed_slots, token_budget_groups  # noqa: E402


def run(graphdef, params, batch, groups, repeats):
    pol = PolicyState(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), make_optimizer(1e-6), LossConfig(), None)
    gs = [pol.put(g) for g in groups]
    lps = [pol.logprobs(pol.params, g) for g in gs]
    args = [(g, lp, lp) for g, lp in zip(gs, lps)]
    den = loss_denominator(jnp.asarray(batch["loss_mask"]), pol.loss_cfg)
    t0 = time.perf_counter()
    C.block(pol.update_groups(args, den))
    compile_s = time.perf_counter() - t0
    upd, lpt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = C.block(pol.update_groups(args, den))
        upd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        C.block([pol.logprobs(pol.params, g) for g in gs])
        lpt.append(time.perf_counter() - t0)
    slots = sum(processed_slots(g)[0] for g in groups)
    return dict(update_s=min(upd), logprob_s=min(lpt), compile_s=compile_s, slots=slots,
                micro=sum(g["tokens"].shape[0] for g in groups), grad_norm=float(jax.device_get(m["grad_norm"])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny float32 model: a smoke run")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="rows per prompt")
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = ap.parse_args()
    shape, dtype, remat = (C.TINY, "float32", False) if args.small else (SMOLLM2, "bfloat16", True)
    print(f"# {C.machine_line()}")
    model = C.make_model(shape, dtype, remat=remat)
    graphdef, params = nnx.split(model)
    B, W = args.groups * args.n, args.prompt
    batch = make_rows(B, W, args.budget, shape["vocab_size"])
    for g in range(args.groups):  # the rows of a group share its first row's prompt
        rows = slice(g * args.n, (g + 1) * args.n)
        for k in ("tokens", "attention_mask", "topk_ids"):
            batch[k][rows, :W] = batch[k][g * args.n, :W]
    pid, plen, rlen = prompt_ids(batch, W)
    print(f"# {shape['family']} D={shape['hidden_size']} L={shape['num_layers']} {dtype}{' remat' if remat else ''}; "
          f"{args.groups} prompts x {args.n} rows, prompt tokens {plen[::args.n].tolist()}, response mean "
          f"{rlen.mean():.1f}; {args.max_tokens} tokens per micro-batch", flush=True)
    variants = {
        "prompt in each row": token_budget_groups(batch, args.max_tokens, 1),
        "shared prompts": [gather_prefix_micro_batches(batch, p, W)
                           for p in plan_prefix_micro_batches(pid, plen, rlen, args.max_tokens, 1)],
    }
    res = {k: run(graphdef, params, batch, g, args.repeats) for k, g in variants.items()}
    lines = [C.machine_line(), "", "| variant | token slots | micro-batches | update s | log-probs s | compile s | "
             "grad norm |", "|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        lines.append(f"| {k} | {r['slots']} | {r['micro']} | {r['update_s']:.3f} | {r['logprob_s']:.3f} | "
                     f"{r['compile_s']:.1f} | {r['grad_norm']:.6g} |")
    a, b = res["prompt in each row"], res["shared prompts"]
    lines += ["", f"shared / rows: token slots {b['slots'] / a['slots']:.2f}x, update {a['update_s'] / b['update_s']:.2f}x "
              f"faster, log-probs {a['logprob_s'] / b['logprob_s']:.2f}x faster"]
    same = np.isclose(a["grad_norm"], b["grad_norm"], rtol=1e-2 if dtype == "bfloat16" else 1e-4)
    lines.append(f"check: the same gradient norm ({a['grad_norm']:.6g} vs {b['grad_norm']:.6g}): "
                 f"{'ok' if same else 'MISMATCH'}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
