"""Decode benchmark on one GPU: the rollout engine (discrete and Gumbel soft-thinking steps) against transformers'
``generate`` (PyTorch, sampling) on the same GPU, in the same run, with the same random weights.

    PYTHONPATH=. python benchmarks/bench_gpu_decode.py [--out decode.md]     # one H100/H200, about 3-5 minutes
    PYTHONPATH=. python benchmarks/bench_gpu_decode.py --small               # CPU smoke run, < 1 minute

Model: Qwen2.5-1.5B-shaped (28 layers, D 1536, 12 heads / 2 KV heads, V 151936, untied head: 1.78B parameters), random
bf16 weights. Batch 1 and 64, prompt 128 random tokens, 256 new tokens (no stop token: every row runs all steps).

For each batch size it reports
- our engine: prefill + decode time (the jitted prefill and the one jitted ``lax.while_loop`` decode that
  ``RolloutEngine.generate`` runs), per-step time, tokens/s, for discrete sampling and for Gumbel soft thinking
  (top-k 5, top-p 0.95, K 5, tau 0.1: every step soft, the next input a mixture of 5 embeddings), with the XLA
  soft-embedding and, where it differs, the backend's default (``embed_impl="auto"``: the Pallas kernel on GPU);
- transformers ``generate(do_sample=True, top_k=5, top_p=0.95, min_new_tokens=256)`` with sdpa attention;
- model-bandwidth utilisation: (weights read per step + the valid KV cache read per step, averaged over the steps)
  / step time / the copy bandwidth measured in the same run;
- the soft/discrete step-time ratio;
- with ``--projections fused,separate`` (the default), discrete decoding once more with the 7 separate weight GEMMs
  per layer instead of the engine's fused q/k/v and gate/up (4), and the step-time ratio of the two.

Checks (the run fails loudly if one fails): our prefill logits match transformers' on the same weights (bf16
tolerance); rollouts are finite, all steps are taken, Gumbel rows are soft at every step with mixture weights that sum
to 1, discrete rows are one-hot.

Issue 8 goals: utilisation >= 60% at batch 1; tokens/s >= 10x transformers at batch 64; soft/discrete <= 1.05.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np

import bench_gpu_common as C  # noqa: E402  (sets XLA_PYTHON_CLIENT_PREALLOCATE before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from softgrpo_jax.sampling import RolloutEngine, SamplingConfig  # noqa: E402
from softgrpo_jax.sampling.engine import decode, prefill  # noqa: E402
from softgrpo_jax.sampling.step import MODES  # noqa: E402


def run_engine(model, prompts: np.ndarray, mode: str, steps: int, embed_impl: str, reps: int, layout: str = "auto",
               attention: str = "xla", fuse: bool = True):
    """(prefill s, decode s, buffers, state) of the engine's two jitted programs, best of ``reps`` timed runs;
    ``attention``: the decode attention ("pallas": each row's own context, the cache rounded up to 256 slots);
    ``fuse``: the engine's fused q / k / v and gate / up weights (where it makes a decode copy of the weights)."""
    B, Pn = prompts.shape
    cfg = SamplingConfig(mode=mode, max_topk=5, temperature=1.0, top_k=5, top_p=0.95, tau=0.1, max_new_tokens=steps)
    # the weights as RolloutEngine.generate decodes them (model dtype; layer scan on GPU, per-layer on CPU)
    mcfg, params = RolloutEngine(model, cfg, pad_id=0, embed_impl=embed_impl, layout=layout,
                                 fuse_projections=fuse).decode_params(model)
    toks = jnp.asarray(prompts)
    mask = jnp.ones_like(toks, dtype=bool)
    modes = jnp.full((B,), MODES[mode], jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(B))

    cache_len = Pn + steps if attention == "xla" else -(-(Pn + steps) // 256) * 256

    def run_prefill():  # (not named prefill: it calls the engine's)
        return C.block(prefill(mcfg, params, toks, mask, cache_len=cache_len))

    def run_decode(logits0, cache):
        return C.block(decode(mcfg, params, logits0, cache, modes, keys, cfg=cfg, end_ids=(), stop_ids=(),
                              pad_id=0, steps=steps, embed_impl=embed_impl, attention=attention))

    logits0, cache = run_prefill()  # compile
    buf, st, _, _ = run_decode(logits0, cache)
    t_pre, t_dec = float("inf"), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        logits0, cache = run_prefill()
        t1 = time.perf_counter()
        buf, st, _, _ = run_decode(logits0, cache)
        t2 = time.perf_counter()
        t_pre, t_dec = min(t_pre, t1 - t0), min(t_dec, t2 - t1)
    return t_pre, t_dec, jax.device_get(buf), logits0


def check_rollout(buf, mode: str, steps: int):
    B = buf["tokens"].shape[0]
    assert np.isfinite(buf["logprob"]).all() and np.isfinite(buf["weights"]).all(), "non-finite rollout"
    assert buf["mask"].sum() == B * steps, f"{mode}: not every row ran {steps} steps"
    w = buf["weights"]
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-3, err_msg=f"{mode}: mixture weights do not sum to 1")
    if mode == "gumbel":
        assert buf["soft"].all(), "gumbel rows must be soft at every step (no think-end configured)"
        assert (buf["ids"][..., 0] == buf["tokens"]).all(), "emitted token must be slot 0"
    else:
        assert not buf["soft"].any() and (w[..., 1:] == 0).all(), "discrete rows must be one-hot"


def run_torch(tm, prompts: np.ndarray, steps: int, reps: int, device: str):
    import torch

    ids = torch.as_tensor(prompts, device=device)
    am = torch.ones_like(ids)

    def gen():
        with torch.no_grad():
            out = tm.generate(input_ids=ids, attention_mask=am, do_sample=True, top_k=5, top_p=0.95,
                              temperature=1.0, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
                              eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = gen()  # warm-up
    assert out.shape == (prompts.shape[0], prompts.shape[1] + steps), out.shape
    return C.best_time(gen, reps=reps)


def torch_logits(tm, prompts: np.ndarray, device: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = tm(input_ids=torch.as_tensor(prompts, device=device)).logits[:, -1].float().cpu().numpy()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model, float32, CPU-sized: a smoke run")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64; small 1,4)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true", help="skip transformers (ours only)")
    ap.add_argument("--layouts", default="scan,per_layer",
                    help="engine weight layouts to time: scan (layer stack under lax.scan), per_layer (unrolled)")
    ap.add_argument("--modes", default="discrete,gumbel", help="sampling modes to time")
    ap.add_argument("--attentions", default=None,
                    help="decode attentions for the discrete rows: xla (every cache slot), pallas (each row's own "
                         "context; interpret mode off GPU). Default: xla,pallas on a GPU, xla elsewhere")
    ap.add_argument("--projections", default="fused,separate",
                    help="decode weights: fused (q/k/v and gate/up as one GEMM each, the engine's default where it "
                         "copies the weights: per_layer or a cast) and/or separate (7 GEMMs per layer; timed for the "
                         "discrete rows of the first layout and attention only)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    a = ap.parse_args()
    small = a.small
    shape, dtype = (C.TINY, "float32") if small else (C.QWEN_1P5B, "bfloat16")
    batches = [int(b) for b in (a.batches or ("1,4" if small else "1,64")).split(",")]
    Pn = a.prompt_len or (16 if small else 128)
    steps = a.new_tokens or (16 if small else 256)
    reps = a.reps or (2 if small else 3)
    on_gpu = jax.default_backend() == "gpu"
    tdev = "cuda" if on_gpu else "cpu"
    t_start = time.time()
    lines = [f"# Decode benchmark ({'small, CPU smoke' if small else 'Qwen2.5-1.5B-shaped, bf16'})", "",
             f"Machine: {C.machine_line()}", ""]
    print("\n".join(lines), flush=True)

    bw = C.copy_bandwidth((64 if small else 512) << 20)
    ceiling = max(bw.values())
    print("copy bandwidth: " + ", ".join(f"{k} {C.fmt_rate(v, 'B/s')}" for k, v in bw.items()), flush=True)
    model = C.make_model(shape, dtype)
    cfg = model.config
    wbytes = C.weight_bytes(model)
    kv_per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    lines += [f"Model: {cfg.num_params() / 1e9:.3f}B parameters ({dtype}); weights read per step {wbytes / 1e9:.3f} GB; "
              f"prompt {Pn}, {steps} new tokens; copy bandwidth " +
              ", ".join(f"{k} {C.fmt_rate(v, 'B/s')}" for k, v in bw.items()) + f" (ceiling {C.fmt_rate(ceiling, 'B/s')})",
              ""]

    impls = ["xla"]
    from softgrpo_jax.ops.soft_embed import resolve_impl

    try:
        if resolve_impl("auto") != "xla":
            impls.append("auto")
    except Exception:  # noqa: BLE001
        pass

    tm = None
    if not a.no_torch:
        try:
            tm = C.torch_model_from(model, device=tdev)
        except Exception as e:  # noqa: BLE001
            print(f"# transformers peer unavailable: {type(e).__name__}: {e}", file=sys.stderr)

    rng = np.random.default_rng(0)
    rows = []  # dicts: batch, variant, prefill_ms, step_ms, tps, mbu, vs
    ok = True
    for B in batches:
        prompts = rng.integers(1, cfg.vocab_size, size=(B, Pn), dtype=np.int32)
        steps_s, by_proj = {}, {}
        ours = []
        kv = kv_per_tok * B * (Pn + (steps + 1) / 2)  # valid cache read per step, averaged over the steps
        layouts = a.layouts.split(",")
        modes = a.modes.split(",")
        attentions = (a.attentions or ("xla,pallas" if on_gpu else "xla")).split(",")
        variants = []
        projections = a.projections.split(",")
        fuse0 = projections[0] == "fused"
        # the other projections under per_layer where timed (the engine fuses where it copies the weights:
        # per-layer, or a cast; a bf16 model under the scan decodes its own weights, separate either way)
        alt = "per_layer" if "per_layer" in layouts else layouts[0]
        for li, layout in enumerate(layouts):
            if "discrete" in modes:
                variants += [("discrete", "xla", layout, att, fuse0) for att in attentions]
                if layout == alt and len(projections) > 1:
                    variants.append(("discrete", "xla", layout, attentions[0], not fuse0))
            if "gumbel" in modes:  # every embedding path under the first layout, the backend's default under others
                variants += [("gumbel", i, layout, attentions[0], fuse0) for i in (impls if li == 0 else impls[-1:])]
        for mode, impl, layout, att, fuse in variants:
            label = mode + (f" ({impl} embed)" if mode == "gumbel" else "") + (f", {layout}" if len(layouts) > 1
                                                                               else "")
            label += ", pallas attention" if att == "pallas" else ""
            label += ", separate projections" if not fuse else ""
            try:
                t_pre, t_dec, buf, logits0 = run_engine(model, prompts, mode, steps, impl, reps, layout, att, fuse)
                check_rollout(buf, mode, steps)
            except Exception as e:  # noqa: BLE001 - report the variant as failed, go on
                print(f"# {label} B={B} failed: {type(e).__name__}: {str(e)[:400]}", file=sys.stderr)
                rows.append(dict(batch=B, variant=f"ours {label}", prefill_ms="FAILED"))
                ok = ok and impl != "xla"
                continue
            if mode == "discrete" and tm is not None and layout == layouts[0] and fuse == fuse0:
                ref = torch_logits(tm, prompts, tdev)
                got = np.asarray(jax.device_get(logits0), np.float32)
                err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)
                tol = 2e-3 if dtype == "float32" else 6e-2
                print(f"B={B}: prefill logits vs transformers: max rel err {err:.2e} (tol {tol})", flush=True)
                if not err < tol:
                    ok = False
                    print(f"# CHECK FAILED: logits differ from transformers ({err:.2e})", file=sys.stderr)
            step = t_dec / steps
            if fuse == fuse0:
                steps_s[(mode, layout)] = steps_s.get((mode, layout), []) + [(label, step)]
            by_proj[(mode, layout, att, fuse)] = step
            row = dict(batch=B, variant=f"ours {label}", prefill_ms=f"{t_pre * 1e3:.1f}", step_ms=f"{step * 1e3:.3f}",
                       tps=B * steps / (t_pre + t_dec), mbu=(wbytes + kv) / step / ceiling)
            rows.append(row)
            ours.append(row)
            print(f"B={B} {label}: prefill {t_pre * 1e3:.1f} ms, {step * 1e3:.3f} ms/step, {row['tps']:,.0f} tok/s, "
                  f"MBU {100 * row['mbu']:.0f}%", flush=True)
            del buf
            gc.collect()
        if tm is not None:
            t = run_torch(tm, prompts, steps, max(1, reps - 1), tdev)
            tps_t = B * steps / t
            rows.append(dict(batch=B, variant="transformers generate (sampling)", step_ms=f"{t / steps * 1e3:.3f}",
                             tps=tps_t, mbu=(wbytes + kv) / (t / steps) / ceiling))
            print(f"B={B} transformers: {t / steps * 1e3:.3f} ms/step (incl. prefill), {tps_t:,.0f} tok/s", flush=True)
            for row in ours:
                row["vs"] = f"{row['tps'] / tps_t:.1f}x"
        for (mode, layout, att, fuse), s_ in by_proj.items():
            if fuse and (mode, layout, att, False) in by_proj:
                rows.append(dict(batch=B, variant=f"fused / separate projections step-time ratio, {mode}, {layout}, "
                                                  f"{att} attention",
                                 step_ms=f"{s_ / by_proj[(mode, layout, att, False)]:.3f}"))
        for (mode, layout), entries in steps_s.items():
            if mode == "gumbel" and ("discrete", layout) in steps_s:
                base = steps_s[("discrete", layout)][0][1]
                for label, s_ in entries:
                    rows.append(dict(batch=B, variant=f"soft/discrete step-time ratio, {label}",
                                     step_ms=f"{s_ / base:.3f}"))
    lines += ["| batch | variant | prefill ms | ms / step | tokens/s (prefill + decode) | bandwidth util. | "
              "tokens/s vs transformers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = f"{r['tps']:,.0f}" if "tps" in r else ""
        mbu = f"{100 * r['mbu']:.0f}%" if "mbu" in r else ""
        lines.append(f"| {r['batch']} | {r['variant']} | {r.get('prefill_ms', '')} | {r.get('step_ms', '')} | {tps} | "
                     f"{mbu} | {r.get('vs', '')} |")
    lines += ["", f"Checks: {'all passed' if ok else 'FAILED (see stderr)'}; wall time {time.time() - t_start:.0f} s.",
              "Bandwidth util. = (weights + valid KV cache read per step) / step time / copy bandwidth; ours: decode "
              "steps only; transformers: its whole generate call / new tokens (prefill included). tokens/s: prefill + decode "
              "for both."]
    return C.emit_report("\n".join(lines), a.out, ok)


if __name__ == "__main__":
    sys.exit(main())
