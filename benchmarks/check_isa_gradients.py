"""Does the SofT-GRPO gradient depend on the CPU's code path? One real Gumbel rollout, then the float32 loss gradient
at the rollout policy computed in one process per code path: XLA's default CPU path, ``XLA_FLAGS=
--xla_cpu_max_isa=AVX2`` (what a CPU without AVX-512 / AMX runs; it emulates one on any x86 machine) and, as a path
known to round differently on every x86 CPU, XLA's own dot thunks instead of YNNPACK's (``SOFTGRPO_YNN_DOTS`` off
where the default is on, and on where it is off). Every process reads the same rollout and the same weights, so the
gradients differ only by float rounding.

Each gradient is computed with the rollout's slot records (``topk_kept``, ``topk_clamped``: what the trainer uses)
and without them (every slot in q, the clip's own gradient at the boundary: the behaviour before the records, and
the original's). A slot whose noise was clamped has z exactly on the clip boundary at the rollout policy, so without
the records each code path's rounding picks its own gradient for it. Reported per path against the default: per
layer, ||g_path - g_default|| / ||g_default|| over all of that layer's weights, median and max over layers (and the
largest over the embedding / norm leaves), for both variants; the target is a median <= 1% with the records.

    python benchmarks/check_isa_gradients.py             # SmolLM2-135M (the demo's model), a demo rollout:
                                                          # 4 prompts x 8 rows, 96 new tokens, demo sampling
                                                          # (~6 minutes on 2 cores)
    python benchmarks/check_isa_gradients.py --small     # a tiny random model, 8 rows x 16 tokens: ~35 s
    python benchmarks/check_isa_gradients.py --bf16      # also bf16 compute against the float32 default, for
                                                          # scale (the demo trains in bf16; not a pass criterion)

Exit status 1 when a path's median exceeds ``--tolerance`` with the records. XLA's cap alone limits only its own
code generator (on an AVX-512 AMD EPYC with jaxlib 0.10.2 it left every gradient bit-identical); the project reads
the cap as a CPU without the features above it, so the AVX2 path also turns the YNNPACK dot fusions off, as a real
AVX2 machine does, and rounds like the YNNPACK pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ISA_FLAG = "--xla_cpu_max_isa=AVX2"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tiny_model(dtype: str = "float32"):
    """A random Llama-like model whose next-token distributions are peaked enough (embedding std 0.06) that top-p
    cuts slots at about half the steps: a rollout with cut, clamped and free slots. Its MLP width (512) puts the
    down projection's contraction where YNNPACK's and XLA's dots round differently."""
    import jax
    from flax import nnx

    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, param_dtype="float32",
                      dtype=dtype)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 3.0  # std 0.06
    jax.block_until_ready(model.embed[...])
    return model


def make_rollout(args, out_dir):
    """The rollout and the batch the trainer builds from it (saved as npz), and where its weights come from."""
    import jax
    import numpy as np
    from flax import nnx

    from softgrpo_jax.rl.objective import group_advantages
    from softgrpo_jax.rl.trainer import rollout_to_batch
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    golds = None
    if args.small:
        model = tiny_model()
        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
        np.savez(os.path.join(out_dir, "params.npz"), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
        cfg = SamplingConfig(mode="gumbel", max_topk=5, top_k=5, top_p=0.95, tau=0.1, max_new_tokens=args.new)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, 256, int(n)).tolist() for n in rng.integers(4, 12, args.prompts)]
        eng = RolloutEngine(model, cfg, pad_id=0)
        source = "tiny"
    else:
        from softgrpo_jax import load_pretrained, load_tokenizer
        from softgrpo_jax.config import get_config, sampling_config
        from softgrpo_jax.train import load_problems

        dc = get_config("demo_smollm2")
        model = load_pretrained(dc.model.path, compute_dtype="float32")
        tok = load_tokenizer(dc.model.path)
        problems, _ = load_problems(dc, dc.data.train, dc.data.train_split, tok)
        prompts = [p["prompt_ids"] for p in problems[:args.prompts]]
        golds = [str(p["answer"]) for p in problems[:args.prompts] for _ in range(args.group)]
        cfg = sampling_config(dc.rollout, max_new_tokens=args.new)
        eng = RolloutEngine.for_tokenizer(model, cfg, tok, think_end=dc.rollout.think_end,
                                          min_bucket=min(128, dc.data.max_prompt_length), dtype="float32")
        source = dc.model.path
    t = time.time()
    r = eng.generate(prompts, jax.random.key(args.seed), n=args.group)
    jax.block_until_ready(r.tokens)
    rollout_s = time.time() - t
    toks, lens = np.asarray(r.tokens), np.asarray(r.lengths)
    if golds is not None:  # the demo's reward (lenient math-verify, 0 for a response cut at the budget)
        from softgrpo_jax import rewards

        texts = [tok.decode(toks[b, :lens[b]].tolist(), skip_special_tokens=True) for b in range(len(toks))]
        score = np.asarray(rewards.score_batch(texts, golds, mode=dc.reward.mode, workers=1,
                                               timeout_s=dc.reward.timeout_s), np.float32)
        score = np.where(np.asarray(r.finish_reason) == 0, 0.0, score)
        reward = "demo reward"
    if golds is None or np.all(score.reshape(-1, args.group).std(1) == 0):
        # a reward that differs within every group (the share of even token ids), so the gradient is not zero
        score = ((toks % 2 == 0) & np.asarray(r.response_mask)).sum(1) / np.maximum(lens, 1)
        reward = "even-token share"
    adv = np.asarray(group_advantages(jax.numpy.asarray(score, jax.numpy.float32), args.group))
    batch = rollout_to_batch(r, adv, min_bucket=16)
    np.savez(os.path.join(out_dir, "batch.npz"), **batch)
    soft = batch["soft_mask"][..., None] & batch["loss_mask"][..., None]
    stats = dict(rows=int(batch["tokens"].shape[0]), positions=int(batch["tokens"].shape[1]),
                 soft_steps=int(soft.sum()), cut_slots=int((soft & ~batch["topk_kept"]).sum()),
                 clamped_kept_slots=int((soft & batch["topk_kept"] & batch["topk_clamped"]).sum()),
                 reward=reward, reward_mean=float(np.mean(score)), rollout_s=round(rollout_s, 1))
    return source, stats


def child(args):
    """One code path: the gradient of the loss at the rollout policy (float32 compute, or ``--dtype``'s), with and
    without the slot records."""
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from softgrpo_jax.config import base_config, loss_config
    from softgrpo_jax.rl.objective import loss_denominator, loss_fn
    from softgrpo_jax.xla_options import compiler_options

    d = args.child
    if args.source == "tiny":
        graphdef, params = nnx.split(tiny_model(args.dtype))
        saved = np.load(os.path.join(d, "params.npz"))  # the parent's weights, not this process's own init
        params = jax.tree_util.tree_map_with_path(lambda k, _: jnp.asarray(saved[jax.tree_util.keystr(k)]), params)
    else:
        from softgrpo_jax import load_pretrained

        graphdef, params = nnx.split(load_pretrained(args.source, compute_dtype=args.dtype))
    h = hashlib.sha256()
    for _, v in jax.tree_util.tree_leaves_with_path(params):
        h.update(np.asarray(v).tobytes())
    full = dict(np.load(os.path.join(d, "batch.npz")))
    cfg = loss_config(base_config().rl)  # the demo's loss settings; on-policy (ratio 1), KL 0 at the first step
    norm = loss_denominator(full["loss_mask"], cfg)
    # compiled with the trainer's per-computation options (the YNNPACK setting)
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None, None, cfg, normalizer=norm, graphdef=graphdef)[0]),
                      compiler_options=compiler_options() or None)
    out = {}
    for variant in ("records", "legacy"):
        b = dict(full)
        if variant == "legacy":  # every slot kept, none clamped: the same as no records, and the same program
            b["topk_kept"] = np.ones_like(b["topk_kept"])
            b["topk_clamped"] = np.zeros_like(b["topk_clamped"])
        B = b["tokens"].shape[0]
        mb = min(args.micro, B)
        total = None
        for s in range(0, B, mb):  # micro-batches summed against the whole batch's denominator, as the trainer does
            g = grad_fn(params, {k: v[s:s + mb] for k, v in b.items()})
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        for k, v in jax.tree_util.tree_leaves_with_path(total):
            out[f"{variant}|{jax.tree_util.keystr(k)}"] = np.asarray(v, np.float32)
    np.savez(os.path.join(d, f"grads_{args.path}.npz"), **out)
    print(json.dumps({"params_sha256": h.hexdigest(), "layers": model_layers(graphdef, params),
                      "compile_options": compiler_options()}))


def model_layers(graphdef, params) -> int:
    from flax import nnx

    return int(nnx.merge(graphdef, params).config.num_layers)


def compare(d, path, n_layers):
    """Per-layer relative differences of a code path's gradients from the default path's, for each variant."""
    import numpy as np

    a, b = np.load(os.path.join(d, f"grads_{path}.npz")), np.load(os.path.join(d, "grads_default.npz"))
    res = {}
    for variant in ("records", "legacy"):
        keys = [k for k in a.files if k.startswith(variant + "|")]
        layers, other = {}, {}
        for k in keys:
            x, y = a[k].astype(np.float64), b[k].astype(np.float64)
            leaf = k.split("|", 1)[1]
            if "layers" in leaf and x.ndim >= 2 and x.shape[0] == n_layers:  # a stacked [L, ...] layer weight
                for i in range(x.shape[0]):
                    dx, ny = layers.setdefault(i, [0.0, 0.0])
                    layers[i] = [dx + np.sum((x[i] - y[i]) ** 2), ny + np.sum(y[i] ** 2)]
            else:
                other[leaf] = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
        rel = np.array([np.sqrt(dx / max(ny, 1e-60)) for dx, ny in layers.values()])
        dot = sum(float(np.sum(a[k].astype(np.float64) * b[k].astype(np.float64))) for k in keys)
        na, nb = (np.sqrt(sum(float(np.sum(z[k].astype(np.float64) ** 2)) for k in keys)) for z in (a, b))
        res[variant] = dict(median_over_layers=float(np.median(rel)), max_over_layers=float(rel.max()),
                            per_layer=[float(v) for v in rel], other=other, cosine=dot / max(na * nb, 1e-60),
                            norm_ratio=na / max(nb, 1e-60))
    return res


def pct(x: float) -> str:
    return "0 (bit-identical)" if x == 0 else f"{100 * x:.2g}%"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny random model, 8 rows x 16 new tokens: ~35 s")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default: 4, the demo's; --small 4)")
    ap.add_argument("--group", type=int, default=None, help="rollouts per prompt (default: 8, the demo's; --small 2)")
    ap.add_argument("--new", type=int, default=None,
                    help="new tokens per rollout (default: 96, the demo's; --small 16)")
    ap.add_argument("--micro", type=int, default=8, help="rows per gradient micro-batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="largest median per-layer difference with the slot records that passes (exit 1 above it)")
    ap.add_argument("--bf16", action="store_true",
                    help="also the gradient with bf16 compute (the demo's), for scale: not part of the pass test")
    ap.add_argument("--json", default="", help="also write the result here")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--source", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.child:
        child(args)
        return
    for k, small, full in (("prompts", 4, 4), ("group", 2, 8), ("new", 16, 96)):
        if getattr(args, k) is None:
            setattr(args, k, small if args.small else full)

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="softgrpo-isa-") as d:
        source, stats = make_rollout(args, d)
        from softgrpo_jax.xla_options import compiler_options

        ynn_default_on = not compiler_options("cpu")  # no option passed: XLA's default (YNNPACK dots) is in use
        paths = {"default": {}, "avx2": {"XLA_FLAGS": ISA_FLAG},
                 "ynn_" + ("off" if ynn_default_on else "on"): {"SOFTGRPO_YNN_DOTS": "off" if ynn_default_on else "on"}}
        if args.bf16:
            paths["bf16"] = {}
        hashes, n_layers, infos, procs = {}, None, {}, {}
        for path, extra in paths.items():
            env = dict(os.environ)
            env.pop("SOFTGRPO_YNN_DOTS", None)
            env["XLA_FLAGS"] = ""  # only the path's own flag (no forced device count either)
            env.update(extra)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", d, "--path", path, "--source", source,
                   "--micro", str(args.micro), "--dtype", "bfloat16" if path == "bf16" else "float32"]
            if not args.small:  # one at a time: each uses every core, and SmolLM2's gradients take memory
                for q in procs.values():
                    q.wait()
            procs[path] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for path, q in procs.items():
            out, err = q.communicate()
            if q.returncode:
                sys.stderr.write(out + err)
                raise SystemExit(f"the {path} gradient failed (exit {q.returncode})")
            info = json.loads(out.strip().splitlines()[-1])
            hashes[path], n_layers = info["params_sha256"], info["layers"]
            infos[path] = dict(env=paths[path], compile_options=info["compile_options"])
        if len(set(hashes.values())) != 1:
            raise SystemExit(f"the processes loaded different weights: {hashes}")
        res = {path: compare(d, path, n_layers) for path in paths if path != "default"}
    result = dict(cpu=cpu_name(), model=source, **stats, paths=infos, result=res, wall_s=round(time.time() - t0, 1))
    print(f"CPU: {result['cpu']}; model {source}; rollout {stats['rows']} rows x {stats['positions']} positions, "
          f"{stats['soft_steps']} scored soft steps, {stats['cut_slots']} slots cut by top-p, "
          f"{stats['clamped_kept_slots']} kept slots with clamped noise; {stats['reward']} mean "
          f"{stats['reward_mean']:.3f}")
    print("| path vs default | gradient | median over layers | max over layers | other leaves (max) | cosine | "
          "norm ratio |")
    print("|---|---|---|---|---|---|---|")
    for path, rr in res.items():
        for variant, r in rr.items():
            name = "with slot records (trainer)" if variant == "records" else "without (every slot, clip as it falls)"
            print(f"| {path} | {name} | {pct(r['median_over_layers'])} | {pct(r['max_over_layers'])} | "
                  f"{pct(max(r['other'].values(), default=0.0))} | {r['cosine']:.4f} | {r['norm_ratio']:.3f} |")
    worst = max(r["records"]["median_over_layers"] for p, r in res.items() if p != "bf16")
    result["passed"] = bool(worst <= args.tolerance)
    print(f"wall time {result['wall_s']:.0f} s")
    print(f"{'PASS' if result['passed'] else 'FAIL'}: with the slot records the median per-layer difference is at "
          f"most {pct(worst)} on every path (tolerance {pct(args.tolerance)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
