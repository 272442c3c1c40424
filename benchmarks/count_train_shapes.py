"""How many programs token-budget micro-batches compile over a run, and what padding they leave: the trainer's plan
(``rl.batching.plan_micro_batches``) over many steps of RL-like lengths, for several ``rl.new_shape_cost`` values.
Counts only (no model runs), so the figures do not depend on the machine.

    python benchmarks/count_train_shapes.py                  # the seed's recipe: 8 devices, 2 mini-batches of 256
                                                             #   rows per step, prompts <= 1024, responses <= 8192
    python benchmarks/count_train_shapes.py --small          # a few steps, seconds

Each distinct micro-batch shape (length, rows) is one compiled update program and one compiled log-prob program,
compiled once per run (and per restart, unless the persistent compilation cache holds it): in
``bench_train_scale.py`` on a 2-core CPU, 115 s of compilation for the 13 shapes of one update of a 6-layer model. Rows: prompts of a group of ``--n`` rows alike, uniform in [prompt/2, prompt] tokens; responses
lognormal with median 3/8 of the budget and sigma 0.6, capped at the budget, 1 row in 16 at the budget.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from softgrpo_jax.rl.batching import plan_micro_batches  # noqa: E402


def lengths(rng, rows: int, n: int, prompt: int, budget: int) -> np.ndarray:
    plen = np.repeat(rng.integers(prompt // 2, prompt + 1, rows // n), n)
    rlen = np.minimum(np.exp(rng.normal(np.log(budget * 3 / 8), 0.6, rows)).astype(int), budget)
    rlen[rng.choice(rows, max(1, rows // 16), replace=False)] = budget
    return plen + np.maximum(rlen, 1)


def simulate(args, cost: float) -> dict:
    rng = np.random.default_rng(args.seed)
    known: set[tuple[int, int]] = set()
    new_per_step, processed, real = [], 0, 0
    for _ in range(args.steps):
        new = 0
        for _ in range(args.minis):
            L = lengths(rng, args.rows, args.n, args.prompt, args.budget)
            plans = plan_micro_batches(L, args.max_tokens, args.devices, known=known, new_shape_cost=cost)
            for p in plans:
                processed += p.rows.size * p.length
                real += int(L[p.rows][~p.filler].sum())
                if (p.length, p.rows.shape[1]) not in known:
                    known.add((p.length, p.rows.shape[1]))
                    new += 1
        new_per_step.append(new)
    return dict(cost=cost, padding=1 - real / processed, programs=len(known), first=new_per_step[0],
                early=sum(new_per_step[1:10]), late=sum(new_per_step[10:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--minis", type=int, default=2, help="mini-batches (optimiser updates) per step")
    ap.add_argument("--rows", type=int, default=256, help="rows per mini-batch")
    ap.add_argument("--n", type=int, default=8, help="rows per prompt")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=8192, help="response budget (max_new_tokens)")
    ap.add_argument("--devices", type=int, default=8, help="data-parallel devices")
    ap.add_argument("--max-tokens", type=int, default=16384, help="rl.max_tokens_per_micro_batch (per device)")
    ap.add_argument("--costs", default="0,0.03,0.1,0.25", help="rl.new_shape_cost values, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="12 steps of 32 rows, 2 devices, budget 1024")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    if args.small:
        args.steps, args.rows, args.prompt, args.budget, args.devices, args.max_tokens = 12, 32, 128, 1024, 2, 4096
    head = (f"{args.steps} steps x {args.minis} mini-batches of {args.rows} rows ({args.n} per prompt), prompts <= "
            f"{args.prompt}, responses lognormal (median {args.budget * 3 // 8}, sigma 0.6, cap {args.budget}), "
            f"{args.devices} devices, {args.max_tokens} tokens per micro-batch and device")
    lines = [head, "", "| rl.new_shape_cost | padding | programs | new at step 1 | steps 2-10 | steps 11+ |",
             "|---|---|---|---|---|---|"]
    print(head, flush=True)
    for c in (float(x) for x in args.costs.split(",")):
        r = simulate(args, c)
        lines.append(f"| {r['cost']:g} | {100 * r['padding']:.1f}% | {r['programs']} | {r['first']} | {r['early']} "
                     f"| {r['late']} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
