"""Train-step benchmark on one GPU: forward + backward + AdamW at batch 4 x 4096 tokens, ours (JAX, rematerialised
layers) against transformers (PyTorch, sdpa attention, fused AdamW) on the same GPU, in the same run, with the same
random weights.

    PYTHONPATH=. python benchmarks/bench_gpu_train.py [--out train.md]     # one H100/H200, about 3-5 minutes
    PYTHONPATH=. python benchmarks/bench_gpu_train.py --small              # CPU smoke run, < 1 minute

Model: Qwen2.5-1.5B-shaped (1.78B parameters), bf16 weights and activations on both sides (float32 softmax, norms
and loss). Rows:
- ``ours LM step``: next-token cross-entropy over the whole sequence (the vocabulary log-probs in chunks of 1024
  positions), ``optax.adamw``, one jitted step with params and optimizer state donated; with ``remat`` (each layer
  recomputed in the backward pass) and, when it fits, without;
- ``ours SofT-GRPO update``: the project's real update (``rl.trainer.make_update_fn``: Gumbel log-probs of soft
  positions rebuilt from stored top-K ids and perturbed log-probs, clipped PPO loss + k3 KL, logits in 1024-token
  chunks, clip-by-global-norm + AdamW) on a synthetic rollout of the same size (512 prompt + 3584 response tokens,
  the first 3000 response steps soft);
- ``transformers``: ``model(input_ids, labels=input_ids).loss.backward(); AdamW(fused=True).step()``, without
  gradient checkpointing when it fits (else with).

Also measured in the same run: the bf16 matmul rate (8192^3), for model-FLOP utilisation
(6 x non-embedding parameters x tokens + causal attention 6 x L x T x D x tokens, over the matmul rate).

Checks: our initial loss equals transformers' on the same weights and batch (bf16 tolerance), every loss is finite,
and our loss falls over the timed steps (same batch each step).

Issue 8 goal: ours >= 1.1x the tokens/s of transformers.
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402


def same_weights(model, **config_changes):
    """``model``'s weights under a changed config (e.g. remat off): a new graphdef merged with the same state."""
    from softgrpo_jax.models import Transformer

    cfg = model.config.replace(**config_changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, abstract=True)))
    return nnx.merge(graphdef, nnx.state(model))


def lm_step_fn(graphdef, tx):
    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, params)
        h = model(tokens, return_hidden=True)[:, :-1]
        tgt = tokens[:, 1:]
        # the vocabulary-wide log-probs in chunks of 1024 positions (ops.vocab_logprobs): never the float32
        # [B, T-1, V] logits and their gradient at once (82.5 GiB at 4 x 4096 with Qwen's vocabulary)
        return -jnp.mean(model.vocab_logprobs(h, tgt, jnp.ones(tgt.shape, bool), chunk_size=1024))

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(loss_fn)


def check_fused_attention(dtype: str) -> tuple[bool, str]:
    """cuDNN attention (attention="cudnn") against the XLA path on a small random model in the benchmark's dtype:
    logits at real positions and parameter gradients, rows left-padded, right-padded, both with a hole, unpadded."""
    shape = dict(C.TINY, num_layers=3)
    base = C.make_model(shape, dtype)
    rng = np.random.default_rng(7)
    B, T = 4, 96
    ids = jnp.asarray(rng.integers(1, shape["vocab_size"], size=(B, T), dtype=np.int32))
    mask = np.ones((B, T), bool)
    mask[0, :20] = False
    mask[1, 70:] = False
    mask[2, :9] = mask[2, 80:] = False
    mask[2, 40] = False
    mask = jnp.asarray(mask)
    w = jnp.asarray(rng.standard_normal((B, T, shape["vocab_size"])), jnp.float32) * mask[..., None]

    def run(impl):
        graphdef, params = nnx.split(same_weights(base, attention=impl))

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits, -1) * w), logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits, np.float64), [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]

    try:
        lx, gx = run("xla")
        lc, gc_ = run("cudnn")
    except Exception as e:  # noqa: BLE001
        return False, f"cuDNN attention check FAILED to run: {type(e).__name__}: {str(e)[:300]}"
    real = np.asarray(mask)
    lerr = np.abs(lc[real] - lx[real]).max() / np.abs(lx[real]).max()
    gerr = max(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12) for a, b in zip(gx, gc_))
    finite = np.isfinite(lc).all() and all(np.isfinite(b).all() for b in gc_)
    tol = 1e-4 if dtype == "float32" else 3e-2
    good = bool(finite and lerr < tol and gerr < 2 * tol)
    return good, (f"cuDNN attention vs XLA path ({dtype}, padded rows): logits max rel err {lerr:.1e}, "
                  f"gradients max rel err {gerr:.1e} (tol {tol}, {2 * tol}); finite {finite}: "
                  f"{'ok' if good else 'CHECK FAILED'}")


def time_ours_lm(model, tokens, steps: int, lr: float):
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # the timed steps donate these, not the model's own arrays
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt = tx.init(params)
    step, loss_fn = lm_step_fn(graphdef, tx)
    t0 = time.perf_counter()
    params, opt, loss0 = C.block(step(params, opt, tokens))
    compile_s = time.perf_counter() - t0
    losses, times = [float(loss0)], []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt, loss = C.block(step(params, opt, tokens))
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    del params, opt
    return min(times), compile_s, losses


def time_ours_softgrpo(model, B: int, T: int, prompt: int, soft_steps: int, steps: int, lr: float):
    from softgrpo_jax.rl.objective import LossConfig
    from softgrpo_jax.rl.trainer import UpdateSettings, make_logprob_fn, make_optimizer, make_update_fn

    cfg = model.config
    K = 5
    rng = np.random.default_rng(1)
    V = cfg.vocab_size
    tokens = rng.integers(1, V, size=(B, T), dtype=np.int32)
    ids = np.zeros((B, T, K), np.int32)
    ids[..., 0] = tokens
    soft = np.zeros((B, T), bool)
    soft[:, prompt:prompt + soft_steps] = True
    ids[soft, 1:] = rng.integers(1, V, size=(int(soft.sum()), K - 1))
    ytil = np.where(soft[..., None], np.log(rng.dirichlet(np.ones(K), size=(B, T)) + 1e-6) +
                    rng.gumbel(size=(B, T, K)).clip(-1.5, 3), 0.0).astype(np.float32)
    loss_mask = np.zeros((B, T), bool)
    loss_mask[:, prompt:] = True
    batch = dict(tokens=tokens, attention_mask=np.ones((B, T), bool), topk_ids=ids, topk_ytil=ytil, soft_mask=soft,
                 loss_mask=loss_mask, advantages=rng.standard_normal(B).astype(np.float32),
                 tau=np.full((B,), 0.1, np.float32))
    mb = jax.tree.map(lambda a: jnp.asarray(a[None]), batch)  # one micro-batch of B rows
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)
    loss_cfg = LossConfig(chunk_size=1024)
    tx = make_optimizer(lr)
    opt = tx.init(params)
    lp = make_logprob_fn(graphdef, loss_cfg)
    old = C.block(lp(params, mb))
    upd = make_update_fn(graphdef, tx, UpdateSettings(loss_cfg, 1))
    t0 = time.perf_counter()
    params, opt, m = C.block(upd(params, opt, mb, old, old))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt, m = C.block(upd(params, opt, mb, old, old))
        times.append(time.perf_counter() - t0)
    m = jax.device_get(m)
    ok = bool(np.isfinite(m["grad_norm"]) and not m["skipped"])
    del params, opt, old
    return min(times), compile_s, ok, float(m["grad_norm"])


def time_torch(tm, tokens_np, steps: int, lr: float, device: str):
    import torch

    x = torch.as_tensor(tokens_np, device=device, dtype=torch.long)
    tm.train()
    opt = torch.optim.AdamW(tm.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            fused=device == "cuda")
    with torch.no_grad():
        loss0 = float(tm(input_ids=x, labels=x).loss)

    def one():
        loss = tm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    checkpointing = False
    try:
        one()
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        tm.gradient_checkpointing_enable()
        checkpointing = True
        one()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(one())
        times.append(time.perf_counter() - t0)
    del opt
    return min(times), loss0, losses, checkpointing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model, float32, CPU-sized: a smoke run")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (best is reported)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-no-remat", action="store_true", help="do not try the step without rematerialisation")
    ap.add_argument("--attention", default=None,
                    help="comma-separated attention paths to time (default xla,cudnn on a GPU, xla elsewhere)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    small = a.small
    shape, dtype = (C.TINY, "float32") if small else (C.QWEN_1P5B, "bfloat16")
    B = a.batch or (2 if small else 4)
    T = a.seq or (64 if small else 4096)
    steps = a.steps or (2 if small else 4)
    lr = 1e-4
    on_gpu = jax.default_backend() == "gpu"
    tdev = "cuda" if on_gpu else "cpu"
    t_start = time.time()
    lines = [f"# Train-step benchmark ({'small, CPU smoke' if small else 'Qwen2.5-1.5B-shaped, bf16'})", "",
             f"Machine: {C.machine_line()}", ""]
    print("\n".join(lines), flush=True)
    mm = C.matmul_rate(512 if small else 8192, jnp.float32 if small else jnp.bfloat16)
    peak = max(mm.values())
    print("matmul: " + ", ".join(f"{k} {C.fmt_rate(v, 'FLOP/s')}" for k, v in mm.items()), flush=True)
    model = C.make_model(shape, dtype, remat=True)
    cfg = model.config
    tokens_np = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(B, T), dtype=np.int32)
    ntok = B * T
    nonembed = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    flops = 6 * nonembed * ntok + 6 * cfg.num_layers * T * cfg.hidden_size * ntok  # causal attention: half of 12LTD
    lines += [f"Model: {cfg.num_params() / 1e9:.3f}B parameters ({dtype}); batch {B} x {T} tokens; "
              f"{flops / 1e12:.1f} TFLOP per step; matmul rate " +
              ", ".join(f"{k} {C.fmt_rate(v, 'FLOP/s')}" for k, v in mm.items()), ""]
    rows = []
    ok = True

    # transformers first: its caching allocator gives memory back (empty_cache), JAX's pool would not
    t_torch = None
    if not a.no_torch:
        try:
            import torch

            tm = C.torch_model_from(model, device=tdev)
            tt, tloss0, tlosses, ckpt = time_torch(tm, tokens_np, steps, lr, tdev)
            t_torch = tt
            rows.append(("transformers (sdpa, " + ("fused " if on_gpu else "") + "AdamW" +
                         (", gradient checkpointing" if ckpt else "") + ")",
                         tt, None, ""))
            print(f"transformers: {tt * 1e3:.1f} ms/step, loss {tloss0:.4f} -> {tlosses[-1]:.4f}", flush=True)
            ok = ok and all(np.isfinite(tlosses))
            del tm
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            print(f"# transformers peer unavailable: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            tloss0 = None
    else:
        tloss0 = None

    tokens = jnp.asarray(tokens_np)
    impls = (a.attention or ("xla,cudnn" if on_gpu else "xla")).split(",")
    if "cudnn" in impls:
        good, msg = check_fused_attention(dtype)
        print(msg, flush=True)
        lines += [msg, ""]
        ok = ok and good
    for impl in impls:
        # without remat only the last attention listed (the XLA path's [B, H, T, T] scores do not fit: 218 GB)
        for remat in (True, False) if impl == impls[-1] and not a.skip_no_remat else (True,):
            m = same_weights(model, remat=remat, attention=impl)
            label = f"ours LM step ({'remat' if remat else 'no remat'}, {impl} attention)"
            try:
                t, comp, losses = time_ours_lm(m, tokens, steps, lr)
            except Exception as e:  # noqa: BLE001 - out of memory without remat is expected on big shapes
                print(f"# {label}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                rows.append((label, None, None, "did not run (see stderr)"))
                if remat:
                    ok = False
                continue
            note = f"compile {comp:.0f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            if remat:
                if not all(np.isfinite(losses)) or not losses[-1] < losses[0]:
                    ok = False
                    print(f"# CHECK FAILED: losses {losses}", file=sys.stderr)
                if tloss0 is not None:
                    err = abs(losses[0] - tloss0) / abs(tloss0)
                    tol = 1e-4 if dtype == "float32" else 2e-2
                    note += f"; initial loss vs transformers rel err {err:.1e}"
                    print(f"initial loss ours {losses[0]:.5f} vs transformers {tloss0:.5f} (rel err {err:.1e}, "
                          f"tol {tol})")
                    if not err < tol:
                        ok = False
                        print("# CHECK FAILED: initial loss differs from transformers", file=sys.stderr)
            rows.append((label, t, None, note))
            print(f"{label}: {t * 1e3:.1f} ms/step ({note})", flush=True)
            del m
            gc.collect()

    for impl in impls:
        label = f"ours SofT-GRPO update (Gumbel log-probs, clipped loss + KL, chunked logits; {impl} attention)"
        try:
            prompt = T // 8
            t, comp, good, gn = time_ours_softgrpo(same_weights(model, remat=True, attention=impl), B, T, prompt,
                                                   min(T - prompt, (T - prompt) * 3000 // 3584), steps, lr)
            ok = ok and good
            rows.append((label, t, None, f"compile {comp:.0f} s; grad norm {gn:.3g}"))
            print(f"{label}: {t * 1e3:.1f} ms/step", flush=True)
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"# {label} failed: {type(e).__name__}: {str(e)[:400]}", file=sys.stderr)
            rows.append((label, None, None, "FAILED"))
        gc.collect()

    lines += ["| variant | s / step | tokens/s | MFU | vs transformers | notes |", "|---|---|---|---|---|---|"]
    for label, t, _, note in rows:
        if t is None:
            lines.append(f"| {label} | | | | | {note} |")
            continue
        vs = f"{t_torch / t:.2f}x" if t_torch else ""
        lines.append(f"| {label} | {t:.3f} | {ntok / t:,.0f} | {100 * flops / t / peak:.0f}% | {vs} | {note} |")
    lines += ["", f"Checks: {'all passed' if ok else 'FAILED (see stderr)'}; wall time {time.time() - t_start:.0f} s. "
              "MFU = (6 x non-embedding params x tokens + 6 x L x T x D x tokens) / step time / the matmul rate "
              "measured above. The SofT-GRPO update does more work than an LM step (two extra gathers and the "
              "Gumbel terms per position) and uses float32 optimizer arithmetic; its MFU uses the same formula."]
    return C.emit_report("\n".join(lines), a.out, ok)


if __name__ == "__main__":
    sys.exit(main())
