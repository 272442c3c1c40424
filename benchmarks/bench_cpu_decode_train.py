"""CPU benchmark, side by side in one run on the same machine: SmolLM2-135M-Instruct (embedded GGUF weights).

decode: this engine (discrete and Gumbel soft modes; float32 and bf16 weights/cache) vs transformers ``generate``
        (PyTorch, sampling top-k 5, top-p 0.95; float32 and bf16 models), batch 16, 128 new tokens (EOS disabled so
        every row decodes the full length).
train:  forward + backward + AdamW on 16 x 256 tokens (32 prompt tokens, 224 response tokens, all scored): this
        trainer's SofT-GRPO update (float32; and bf16 compute with float32 master weights, without and with remat;
        responses all soft, or with the last 32 tokens discrete as ``</think>`` + an answer would be) and GRPO
        update (float32, bf16 + remat) vs a transformers causal-LM step with torch.optim.AdamW (float32; and under
        torch.autocast bf16). Ratios compare like with like. The SofT-GRPO rows score soft steps from their K ids'
        logits (what the objective needs), so they form vocabulary-wide logits only at the discrete targets;
        transformers' step (a plain LM loss) forms them at every position. Each train row runs in a fresh
        subprocess, one after another (``--in-process``: all in this one): in one process the last row measured
        10.5-11.1 s where alone it took 9.5-10.0 s.
        Rows with ``_huge`` run with glibc's ``glibc.malloc.hugetlb=1`` (transparent huge pages for what malloc
        maps), which the ``softgrpo`` command sets for itself (``softgrpo_jax.cli.hugepage_env``), so this
        project's rows run with it too unless ``--no-hugepages``.
        Rows with ``_tuned`` run the same step with glibc's allocator told to keep freed memory
        (``GLIBC_TUNABLES``: no mmap for large blocks, no trimming; what PyTorch's CPU tuning guide gets from
        jemalloc / tcmalloc). transformers' step allocates its large tensors afresh every step, and on this VM the
        kernel's page faults then cost it 3-10 s of system time per step (reported per row); tuned, it ran
        ~1.4x faster here. This trainer's update reuses one XLA buffer per execution (its faults cost no measurable
        wall time: removing them changed nothing). Each row of this project is also compared with the fastest
        transformers row measured (on a Xeon with AMX, autocast tuned; on an AVX2-only CPU, float32).
        ``--rounds N`` measures the train rows N times, in reverse order every other round (A B, B A, ...), and
        reports medians with each ratio taken within its round: on a VM whose speed drifts 10-20% between runs a
        single pass of rows is one sample of that drift.

    python benchmarks/bench_cpu_decode_train.py [--batch 16 --new 128 --train-len 256 --repeats 2] [--small]
        [--skip-decode] [--rows soft_bf16,soft_bf16_remat,soft_bf16_remat_tuned] [--torch-rows torch_f32,torch_f32_tuned]
        [--rounds 3]

Prints a markdown table (tokens/s and ratios); compile time is reported separately and excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


from bench_cpu_forward import cpu_name  # noqa: E402  (same folder; run as a script)


def bench_ours_decode(model, tok, prompts, new, repeats, mode, dtype=None):
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    cfg = SamplingConfig(mode=mode, max_topk=5, top_k=5, top_p=0.95, tau=0.1, max_new_tokens=new)
    eng = RolloutEngine(model, cfg, think_end_ids=(), stop_ids=(), pad_id=tok.pad_token_id or 0, dtype=dtype)
    t = time.perf_counter()
    r = eng.generate(prompts, jax.random.key(0))
    jax.block_until_ready(r.tokens)
    first = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        r = eng.generate(prompts, jax.random.key(i + 1))
        jax.block_until_ready(r.tokens)
        times.append(time.perf_counter() - t)
    n = int(np.asarray(r.lengths).sum())
    best = min(times)
    return dict(tokens=n, seconds=best, tok_s=n / best, compile_s=first - best, step_ms=1000 * best / new)


def bench_torch_decode(tmodel, tok, prompts, new, repeats):
    import torch

    B = len(prompts)
    P = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    kw = dict(do_sample=True, top_k=5, top_p=0.95, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    with torch.no_grad():
        tmodel.generate(ids, attention_mask=mask, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = tmodel.generate(ids, attention_mask=mask, **kw)
            times.append(time.perf_counter() - t)
    n = (out.shape[1] - P) * B
    best = min(times)
    return dict(tokens=n, seconds=best, tok_s=n / best, step_ms=1000 * best / new)


def train_batch(B, L, K, vocab, soft: bool, seed=0, answer=0):
    """Prompts of 32 tokens, then L - 32 response tokens: soft thinking steps (``soft``) of which the last ``answer``
    are discrete (``</think>`` and the answer), or all discrete."""
    rng = np.random.RandomState(seed)
    P = 32
    toks = rng.randint(0, vocab, (B, L)).astype(np.int32)
    ids = np.zeros((B, L, K), np.int32)
    ids[..., 0] = toks
    ytil = np.zeros((B, L, K), np.float32)
    sm = np.zeros((B, L), bool)
    if soft:
        sm[:, P:] = True
        ids[:, P:, 1:] = rng.randint(0, vocab, (B, L - P, K - 1))
        ytil[:, P:] = np.log(rng.dirichlet(np.ones(K), (B, L - P)) + 1e-6) + rng.gumbel(size=(B, L - P, K))
        if answer:
            sm[:, L - answer:] = False
            ids[:, L - answer:, 1:] = 0
            ytil[:, L - answer:] = 0
    lm = np.zeros((B, L), bool)
    lm[:, P:] = True
    return dict(tokens=toks, attention_mask=np.ones((B, L), bool), topk_ids=ids, topk_ytil=ytil, soft_mask=sm,
                loss_mask=lm, advantages=rng.randn(B).astype(np.float32), tau=np.full((B,), 0.1, np.float32))


ANSWER = 32  # discrete response tokens at the end of the "answer" row's sequences
# glibc malloc keeping freed memory mapped (the "_tuned" rows): no mmap for large blocks, no trimming of the heap
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def bench_ours_train(model_path, B, L, repeats, soft, compute_dtype="float32", remat=False, answer=0, **kw):
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.config import base_config, loss_config
    from softgrpo_jax.rl.trainer import PolicyState, make_optimizer, split_micro

    model = load_pretrained(model_path, compute_dtype=compute_dtype, remat=remat, **kw)
    pol = PolicyState(model, make_optimizer(1e-6), loss_config(base_config().rl), None)
    batch = pol.put(split_micro(train_batch(B, L, 5, model.config.vocab_size, soft, answer=answer), 1))
    old = pol.logprobs(pol.params, batch)
    t = time.perf_counter()
    jax.block_until_ready(pol.update(batch, old, old))
    first = time.perf_counter() - t
    times, faults, sys_s = [], [], []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        jax.block_until_ready(pol.update(batch, old, old))
        times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_s.append(r1.ru_stime - r0.ru_stime)
    i = int(np.argmin(times))
    return dict(tokens=B * L, seconds=times[i], tok_s=B * L / times[i], compile_s=first - times[i],
                minflt=faults[i], sys_s=sys_s[i])


def bench_torch_train(tmodel, B, L, vocab, repeats, autocast=False):
    import contextlib

    import torch

    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-6, weight_decay=0.01)
    ids = torch.tensor(np.random.RandomState(0).randint(0, vocab, (B, L)))
    tmodel.train()

    def step():  # -> the seconds of its phases (eager CPU torch is synchronous)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = tmodel(ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        opt.step()
        return dict(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)

    step()
    times, faults, sys_s, phases = [], [], [], []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        phases.append(step())
        times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_s.append(r1.ru_stime - r0.ru_stime)
    i = int(np.argmin(times))
    return dict(tokens=B * L, seconds=times[i], tok_s=B * L / times[i], minflt=faults[i], sys_s=sys_s[i],
                phases=phases[i])


def median_run(runs: list[dict]) -> dict:
    """The rounds of one train row as one result: tokens/s and seconds the medians, the rest (compile time, page
    faults, phases) from the run nearest the median."""
    med = statistics.median(r["tok_s"] for r in runs)
    out = dict(min(runs, key=lambda r: abs(r["tok_s"] - med)))
    out.update(tok_s=med, seconds=out["tokens"] / med)
    return out


def round_ratios(runs: list[dict], refs: list[dict] | None) -> list[float] | None:
    """Tokens/s of ``runs`` over ``refs`` round by round (None without a reference row)."""
    return None if refs is None else [a["tok_s"] / b["tok_s"] for a, b in zip(runs, refs)]


def train_row(row, hf_dir, B, L, V, repeats):
    """One row of the train table, measured in this process."""
    if row.startswith("torch"):
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        tmodel = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        return bench_torch_train(tmodel, B, L, V, repeats, autocast=row == "torch_autocast")
    bf16 = "bf16" in row
    return bench_ours_train(hf_dir, B, L, repeats, row.startswith("soft"), compute_dtype="bfloat16" if bf16 else
                            "float32", remat="remat" in row, answer=ANSWER if row.endswith("answer") else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes: a plumbing check, not a measurement")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every train row in this process (default: a fresh subprocess per row)")
    ap.add_argument("--rows", help="comma-separated train rows of this project to measure; default: all")
    ap.add_argument("--torch-rows", default="torch_f32,torch_autocast,torch_autocast_tuned",
                    help="comma-separated transformers rows to measure (default: %(default)s; also torch_f32_tuned, "
                    "torch_f32_huge, torch_f32_tuned_huge, torch_autocast_huge). "
                    "On a CPU without native bf16 (AVX2 only) torch's autocast step runs bf16 GEMMs at ~1 GFLOP/s "
                    "and takes many minutes: leave it out there")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="run this project's rows without glibc's huge-page tunable (the `softgrpo` command sets it)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the train rows this many times, the order reversed every other round (A B, B A, "
                    "...: drift of the machine then cancels); tokens/s and ratios are medians over the rounds, each "
                    "ratio taken within a round")
    ap.add_argument("--decode-dtypes", default="float32,bfloat16",
                    help="comma-separated dtypes of the decode rows, both frameworks (default: %(default)s). On a CPU "
                    "without native bf16 (AVX2 only) transformers' bf16 generate runs its GEMMs at ~1 GFLOP/s: "
                    "pass float32 there")
    ap.add_argument("--train-row", help=argparse.SUPPRESS)  # internal: measure one train row, print JSON
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    decode_dtypes = [d.strip() for d in args.decode_dtypes.split(",") if d.strip()]
    if not decode_dtypes or set(decode_dtypes) - {"float32", "bfloat16"}:
        ap.error(f"--decode-dtypes: expected float32 and/or bfloat16, got {args.decode_dtypes!r}")
    if args.train_row:
        import transformers

        V = transformers.AutoConfig.from_pretrained(args.hf_dir).vocab_size
        r = train_row(args.train_row, args.hf_dir, args.train_batch, args.train_len, V, args.repeats)
        print(json.dumps(r))
        return
    if args.small:
        args.batch, args.new, args.train_batch, args.train_len, args.repeats = 2, 8, 2, 48, 1

    import shutil
    import tempfile

    import torch
    import transformers

    from softgrpo_jax import load_pretrained, load_tokenizer, save_pretrained
    # transparent huge pages for what malloc maps (the "_huge" rows): what the `softgrpo` command sets for itself
    # (softgrpo_jax.cli.hugepage_env); this project's rows run with it unless --no-hugepages. Imported here, not at
    # the top: bench_cpu_update_ab.py imports this file under older revisions' packages (--against)
    from softgrpo_jax.cli import HUGEPAGE_TUNABLE as HUGE_MALLOC
    from softgrpo_jax.data.prompts import build_prompt

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_pretrained("smollm2")
    tok = load_tokenizer("smollm2")
    tmp = tempfile.mkdtemp(prefix="softgrpo-bench-hf-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # a 0.5 GB HF copy of SmolLM2 per run otherwise
    save_pretrained(model, tmp, tokenizer=tok)  # the same float32 weights for transformers
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    questions = [f"What is {a} + {b}?" for a, b in zip(range(3, 40, 2), range(50, 10, -2))][:args.batch]
    prompts = [tok(build_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in questions]

    rows, ours, best, per_round = [], {}, None, []
    if not args.skip_decode:
        refs = []  # (our dtype argument: None = the model's float32, transformers' row) per decode dtype
        for name in decode_dtypes:
            bf16 = name == "bfloat16"
            tm = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval() if bf16 else tmodel
            refs.append(("bfloat16" if bf16 else None, bench_torch_decode(tm, tok, prompts, args.new, args.repeats)))
            del tm
            rows.append(("decode", f"transformers generate (sampling), {'bf16' if bf16 else 'float32'}", refs[-1][1],
                         None, None))
        for dt, ref in refs:
            for mode in ("discrete", "gumbel"):
                r = bench_ours_decode(model, tok, prompts, args.new, args.repeats, mode, dtype=dt)
                ours[(dt, mode)] = r
                name = f"softgrpo_jax {mode}{' (K=5)' if mode == 'gumbel' else ''}, {'bf16' if dt else 'float32'}"
                rows.append(("decode", name, r, r["tok_s"] / ref["tok_s"], None))
        print("decode results (printed early):", {r[1]: round(r[2]["tok_s"], 1) for r in rows}, flush=True)
    if not args.skip_train:
        del model
        gc.collect()
        tb, tl, V = args.train_batch, args.train_len, tmodel.config.vocab_size
        del tmodel
        gc.collect()
        names = {"torch_f32": "transformers fwd+bwd+AdamW, float32",
                 "torch_autocast": "transformers fwd+bwd+AdamW, bf16 autocast",
                 "soft_f32": "softgrpo_jax SofT-GRPO update, float32",
                 "grpo_f32": "softgrpo_jax GRPO update, float32",
                 "soft_bf16": "softgrpo_jax SofT-GRPO update, bf16 compute, no remat",
                 "soft_bf16_remat": "softgrpo_jax SofT-GRPO update, bf16 compute + remat",
                 "soft_bf16_remat_answer": f"softgrpo_jax SofT-GRPO update, bf16 compute + remat, last {ANSWER} "
                                           "response tokens discrete",
                 "grpo_bf16_remat": "softgrpo_jax GRPO update, bf16 compute + remat"}
        tuned = {"torch_f32_tuned": "torch_f32", "torch_autocast_tuned": "torch_autocast",
                 "soft_bf16_remat_tuned": "soft_bf16_remat",
                 "grpo_bf16_remat_tuned": "grpo_bf16_remat", "torch_f32_huge": "torch_f32",
                 "torch_f32_tuned_huge": "torch_f32", "torch_autocast_huge": "torch_autocast"}
        names.update({k: names[v] + (", malloc tuned" if "_tuned" in k else "") + (", huge pages" if "_huge" in k
                                                                                    else "") for k, v in tuned.items()})
        # XLA:CPU's YNNPACK dot fusions forced on / off in this project's float32 rows ($SOFTGRPO_YNN_DOTS; the
        # plain rows run its default, auto: softgrpo_jax.xla_options)
        ynn = {f"{k}_{s}": (k, v) for k in ("soft_f32", "grpo_f32") for s, v in (("ynn", "on"), ("noynn", "off"))}
        names.update({k: names[b] + f", YNNPACK dot fusions {v}" for k, (b, v) in ynn.items()})
        if not args.no_hugepages:  # this project's rows as the `softgrpo` command runs them
            names.update({k: v + ", huge pages" for k, v in names.items() if not k.startswith("torch")})
        names = dict(sorted(names.items(), key=lambda kv: not kv[0].startswith("torch")))  # transformers rows first
        if args.in_process:  # GLIBC_TUNABLES and SOFTGRPO_YNN_DOTS apply to a fresh process only
            names = {k: v for k, v in names.items() if k not in tuned and k not in ynn}
        torch_rows = args.torch_rows.split(",") if args.torch_rows else []
        ours_rows = args.rows.split(",") if args.rows else [k for k in names if not k.startswith("torch")]
        unknown = sorted(set(torch_rows + ours_rows) - set(names))
        if unknown or any(not r.startswith("torch") for r in torch_rows):
            raise SystemExit(f"unknown rows {unknown or torch_rows}; rows: {sorted(names)}")
        names = {k: v for k, v in names.items() if k in torch_rows + ours_rows}
        runs = {row: [] for row in names}
        for rnd in range(args.rounds):
            for row in list(names)[::-1 if rnd % 2 else 1]:
                if args.in_process:
                    r = train_row(row, tmp, tb, tl, V, args.repeats)
                else:  # a fresh process per row: no row inherits another's heap, thread pools or caches
                    env = dict(os.environ)
                    tunables = [TUNED_MALLOC] if "_tuned" in row else []
                    if "_huge" in row or (not row.startswith("torch") and not args.no_hugepages):
                        tunables.append(HUGE_MALLOC)
                    if tunables:
                        env["GLIBC_TUNABLES"] = ":".join(tunables)
                    if row in ynn:
                        env["SOFTGRPO_YNN_DOTS"] = ynn[row][1]
                    base = ynn[row][0] if row in ynn else tuned.get(row, row)
                    cmd = [sys.executable, os.path.abspath(__file__), "--train-row", base, "--hf-dir", tmp,
                           "--train-batch", str(tb), "--train-len", str(tl), "--repeats", str(args.repeats)]
                    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
                    r = json.loads(out.strip().splitlines()[-1])  # stderr shown
                runs[row].append(r)
                rnd_s = f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""
                print(f"train {row}{rnd_s}: {r['tok_s']:.1f} tokens/s", flush=True)
        res = {row: median_run(rs) for row, rs in runs.items()}
        best = max((r for r in res if r.startswith("torch")), key=lambda r: res[r]["tok_s"], default=None)
        for row, name in names.items():
            ref = None if row.startswith("torch") else "torch_autocast" if "bf16" in row else "torch_f32"
            ref_t = None if row.startswith("torch") else best
            ratio, ratio_t = (round_ratios(runs[row], runs.get(x)) for x in (ref, ref_t))
            rows.append(("train", name, res[row], ratio, ratio_t))
            per_round.append((name, runs[row], ratio, ratio_t))

    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; SmolLM2-135M float32")
    print(f"decode: batch {args.batch}, {args.new} new tokens; train: {args.train_batch} x {args.train_len} tokens\n")
    if best:
        print(f"fastest transformers row: {names[best]}")
    print("| what | implementation | tokens/s | time (s) | vs transformers, same dtype | vs fastest transformers row | "
          "compile (s) | page faults, system s per step |")
    print("|---|---|---|---|---|---|---|---|")
    for what, name, r, ratio, ratio_t in rows:
        faults = f"{r['minflt']:,}, {r['sys_s']:.2f}" if "minflt" in r else ""
        # train ratios come per round (a list): their median
        ratio, ratio_t = (statistics.median(x) if isinstance(x, list) else x for x in (ratio, ratio_t))
        print(f"| {what} | {name} | {r['tok_s']:.1f} | {r['seconds']:.2f} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if ratio_t is None else f'{ratio_t:.2f}x'} | "
              f"{r.get('compile_s', float('nan')):.1f} | {faults} |")
    if args.rounds > 1 and per_round:
        print(f"\nTrain rows per round (rounds in alternating order; the table gives medians over the {args.rounds} "
              "rounds, the run nearest the median for time, compile and faults, each ratio taken within a round):\n")
        print("| implementation | tokens/s per round | vs transformers, same dtype, per round | "
              "vs fastest transformers row, per round |")
        print("|---|---|---|---|")
        for name, rs, ratio, ratio_t in per_round:
            fmt = lambda xs, f: "" if xs is None else " / ".join(f.format(x) for x in xs)  # noqa: E731
            print(f"| {name} | {fmt([x['tok_s'] for x in rs], '{:.1f}')} | {fmt(ratio, '{:.2f}x')} | "
                  f"{fmt(ratio_t, '{:.2f}x')} |")
    print("\n(ratios: each row of this project against transformers in the same dtype. The SofT-GRPO rows score "
          "a soft step from its K ids' logits and form vocabulary-wide logits only at scored discrete targets; "
          "transformers' step computes the full-vocabulary loss at every position, as a plain LM step does)")
    for what, name, r, _, _ in rows:
        if "phases" in r:
            print(f"{name}, the timed step's phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items())
                  + " (forward includes the loss)")
    for dt in dict.fromkeys(k[0] for k in ours):  # the decode dtypes, in the order measured
        a, b = ours[(dt, "gumbel")], ours[(dt, "discrete")]
        print(f"Gumbel / discrete decode time, {'bf16' if dt else 'float32'}: {a['step_ms'] / b['step_ms']:.3f} "
              f"({a['step_ms']:.1f} ms vs {b['step_ms']:.1f} ms per new token, prefill included)")


if __name__ == "__main__":
    main()
