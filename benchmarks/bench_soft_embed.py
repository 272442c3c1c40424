"""Benchmark of the probability-weighted embedding (softgrpo_jax.ops.soft_embed): XLA vs the Pallas kernels.

One command, installs nothing (imports jax and numpy; torch only if present, for a second copy-bandwidth figure):

    PYTHONPATH=. python benchmarks/bench_soft_embed.py                    # on one GPU (or TPU), < 8 minutes
    PYTHONPATH=. python benchmarks/bench_soft_embed.py --small --interpret   # CPU smoke run, < 1 minute

What it does, in one run on one device:
1. measures the device's copy bandwidth (a jitted device-to-device copy of 512 MiB, and torch's ``copy_`` when torch
   sees the GPU; the larger figure is the ceiling);
2. checks every variant against a float64 NumPy reference on a subset of rows and against the XLA path on all rows
   (bf16: within one bf16 ulp), and that the outputs are finite;
3. sweeps a few kernel tile configurations (bounded by ``--sweep-budget-s``) and keeps the fastest per form and size;
4. times XLA plain, XLA fused, Pallas plain, Pallas fused at the training size (N=65536, K=5, D=1536, V=151936, bf16
   table; one call per dispatch, back to back) and at the decode size (N=512, inside a jitted ``fori_loop`` that runs
   a decode-like step: ids change every step, the embedding is added to a carried hidden state);
5. prints a markdown table for benchmarks/RESULTS.md: time, bytes over time against the floor (K rows read per token
   plus the output written), fraction of the copy bandwidth, and speed relative to the XLA path of the same form.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from softgrpo_jax.ops import pallas_gpu, pallas_tpu  # noqa: E402
from softgrpo_jax.ops.soft_embed import soft_embed, soft_embed_fused, soft_weights  # noqa: E402


@dataclasses.dataclass
class Size:
    name: str
    n: int
    k: int
    d: int
    v: int
    dtype: object


def _block(x):
    return jax.block_until_ready(x)


def time_calls(fn, args, *, min_time=0.2, reps=5, max_iters=2000, min_iters=3):
    """Seconds per call: back-to-back dispatches, synchronised at the end of each repetition; the best repetition."""
    _block(fn(*args))
    t0 = time.perf_counter()
    _block(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(min_iters, min_time / reps / one)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        _block(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def copy_bandwidth(nbytes, small):
    """Bytes moved (read + write) per second by a device copy: jitted jnp.copy, and torch when it sees a GPU."""
    figures = {}
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.copy(a))
    t = time_calls(f, (x,), min_time=0.1 if small else 0.5)
    figures["jax copy"] = 2 * nbytes / t
    del x
    if jax.default_backend() == "gpu" and not small:
        try:
            import torch

            if torch.cuda.is_available():
                src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
                dst = torch.empty_like(src)
                for _ in range(3):
                    dst.copy_(src)
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        dst.copy_(src)
                    torch.cuda.synchronize()
                    best = min(best, (time.perf_counter() - t0) / 20)
                figures["torch copy_"] = 2 * nbytes / best
                del src, dst
                torch.cuda.empty_cache()
        except Exception as e:  # torch absent or unusable: the jax figure stands alone
            figures["torch copy_ (unavailable)"] = float("nan")
            print(f"# torch copy bandwidth skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return figures


def make_inputs(size: Size, seed=0):
    key = jax.random.key(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    table = (jax.random.normal(k1, (size.v, size.d), jnp.float32) + 0.25).astype(size.dtype)
    ids = jax.random.randint(k2, (size.n, size.k), 0, size.v, jnp.int32)
    weights = jax.random.uniform(k3, (size.n, size.k), jnp.float32, 0.05, 1.0)
    ytil = jnp.log(jax.random.dirichlet(k4, jnp.ones(size.k), (size.n,)) + 1e-6) + jax.random.gumbel(
        k5, (size.n, size.k))
    disc = jnp.arange(size.n) % 7 == 0  # some discrete positions
    return table, ids, weights, ytil.astype(jnp.float32), disc


def floor_bytes(size: Size):
    return size.n * (size.k + 1) * size.d * jnp.dtype(size.dtype).itemsize


def variants(kernel, interpret, tau):
    """name -> (form, builder(config) -> f(table, ids, w_or_ytil, disc))."""
    def xla_plain(cfg):
        return lambda t, i, w, dsc: soft_embed(t, i, w, impl="xla")

    def xla_fused(cfg):
        return lambda t, i, y, dsc: soft_embed_fused(t, i, y, tau, dsc, impl="xla")

    def pallas_plain(cfg):
        return lambda t, i, w, dsc: soft_embed(t, i, w, impl="pallas", interpret=interpret, kernel=kernel,
                                               config=cfg)

    def pallas_fused(cfg):
        return lambda t, i, y, dsc: soft_embed_fused(t, i, y, tau, dsc, impl="pallas", interpret=interpret,
                                                     kernel=kernel, config=cfg)

    return {"XLA plain": ("plain", xla_plain), "XLA fused": ("fused", xla_fused),
            "Pallas plain": ("plain", pallas_plain), "Pallas fused": ("fused", pallas_fused)}


def sweep_configs(kernel, size: Size, small):
    """Candidate tile configurations (None = the module's default), the default first."""
    if kernel == "tpu":
        sub = 16 if jnp.dtype(size.dtype).itemsize == 2 else 8
        bts = [b for b in (sub, 32, 64, 128) if b >= sub]
        return [None] + ([] if small else [pallas_tpu.TpuConfig(block_tokens=b) for b in bts])
    if small:
        return [None, pallas_gpu.GpuConfig(block_tokens=4, block_cols=128, num_warps=2, cols_fastest=False)]
    out = [None]
    for bt in (1, 2, 4, 8, 16, 32):
        for bd in (256, 512):
            if bd > size.d:
                continue
            for nw in (2, 4, 8):
                per_thread = bt * bd // (32 * nw)
                if 8 <= per_thread <= 64:
                    out.append(pallas_gpu.GpuConfig(block_tokens=bt, block_cols=bd, num_warps=nw))
    # the other launch order, for a few tile shapes
    out += [pallas_gpu.GpuConfig(block_tokens=bt, block_cols=512, num_warps=nw, cols_fastest=False)
            for bt, nw in ((1, 2), (8, 4)) if 512 <= size.d]
    return out


def cfg_str(cfg, kernel, size):
    if cfg is None:
        cfg = pallas_gpu.default_config(size.n, size.d, size.k) if kernel == "gpu" else pallas_tpu.TpuConfig()
        prefix = "default "
    else:
        prefix = ""
    if isinstance(cfg, pallas_gpu.GpuConfig):
        order = "" if cfg.cols_fastest else " tokens-fastest"
        return f"{prefix}BT={cfg.block_tokens} BD={cfg.block_cols} warps={cfg.num_warps}{order}"
    bt = pallas_tpu.block_tokens(size.n, size.k, size.d, jnp.dtype(size.dtype).itemsize, cfg)
    return f"{prefix}BT={bt}"


def check(out, ref_xla, table, ids, w, dtype, rows=512):
    """Finite everywhere; within one bf16 ulp (or 1e-5 in f32) of the XLA path and of a float64 reference."""
    rtol = 2 ** -7 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-5
    out32 = out.astype(jnp.float32)
    # all rows, on the device: finite and close to the XLA path
    if not bool(jnp.all(jnp.isfinite(out32))):
        return False, float("inf")
    if not bool(jnp.allclose(out32, ref_xla.astype(jnp.float32), rtol=rtol, atol=1e-5)):
        return False, float("nan")
    # a subset of rows, on the host: against float64
    sel = np.linspace(0, out32.shape[0] - 1, min(rows, out32.shape[0])).astype(int)
    ids_np = np.asarray(ids)[sel]
    rows64 = np.asarray(table[jnp.asarray(ids_np.reshape(-1))].astype(jnp.float32), np.float64)
    ref64 = np.einsum("nk,nkd->nd", np.asarray(w, np.float64)[sel], rows64.reshape(*ids_np.shape, -1))
    got = np.asarray(out32[jnp.asarray(sel)], np.float64)
    err = float(np.max(np.abs(got - ref64) / (np.abs(ref64) + 1e-3)))
    return bool(np.allclose(got, ref64, rtol=rtol, atol=1e-5)), err


def decode_loop(fn, steps, v):
    """A jitted decode-like loop: each step embeds ids that change with the step and adds the result to h."""
    @jax.jit
    def run(table, ids, w, disc, h):
        def body(i, h):
            e = fn(table, (ids + i) % v, w, disc)
            return h + e.astype(h.dtype)

        return lax.fori_loop(0, steps, body, h)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)")
    p.add_argument("--kernel", choices=["gpu", "tpu"], default=None,
                   help="which Pallas kernel (default: tpu on TPU, else gpu)")
    p.add_argument("--no-sweep", action="store_true", help="time only the default kernel configuration")
    p.add_argument("--sweep-budget-s", type=float, default=240.0,
                   help="time allowed for the config sweeps (all four together)")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    backend = jax.default_backend()
    kernel = a.kernel or ("tpu" if backend == "tpu" else "gpu")
    if backend == "cpu" and not a.interpret:
        p.error("on CPU the Pallas kernels only run in interpret mode: pass --interpret (and --small)")
    dev = jax.devices()[0]
    if a.small:
        # TPU interpret mode simulates every row DMA: fewer tokens there
        train = Size("training", 200 if kernel == "gpu" else 40, 5, 256, 1000, jnp.bfloat16)
        decode = Size("decode", 16, 5, 256, 1000, jnp.bfloat16)
        steps = a.decode_steps or 2
        copy_bytes = 8 << 20
    else:
        train = Size("training", 65536, 5, 1536, 151936, jnp.bfloat16)
        decode = Size("decode", 512, 5, 1536, 151936, jnp.bfloat16)
        steps = a.decode_steps or 200
        copy_bytes = 512 << 20
    tau = 0.1
    timing = dict(min_time=0.02, reps=2, min_iters=1) if a.small else dict(min_time=0.3, reps=5)

    bw = copy_bandwidth(copy_bytes, a.small)
    ceiling = max(v for v in bw.values() if np.isfinite(v))
    print(f"# device: {dev.device_kind} ({backend}), jax {jax.__version__}, python {platform.python_version()}")
    print("# copy bandwidth: " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in bw.items()))

    rows = []
    all_ok = True
    for size in (train, decode):
        table, ids, w, ytil, disc = make_inputs(size)
        ref = {"plain": jax.jit(lambda t, i, x, d: soft_embed(t, i, x, impl="xla"))(table, ids, w, disc),
               "fused": jax.jit(lambda t, i, x, d: soft_embed_fused(t, i, x, tau, d, impl="xla"))(
                   table, ids, ytil, disc)}
        w_fused = soft_weights(ytil, tau, disc)
        h0 = jnp.zeros((size.n, size.d), size.dtype)
        results = {}
        for name, (form, build) in variants(kernel, a.interpret, tau).items():
            x = w if form == "plain" else ytil
            cfgs = [None] if name.startswith("XLA") or a.no_sweep else sweep_configs(kernel, size, a.small)
            best = None
            sweep_deadline = time.perf_counter() + a.sweep_budget_s / 4  # 2 sizes x 2 Pallas forms
            for ci, cfg in enumerate(cfgs):
                if ci > 0 and time.perf_counter() > sweep_deadline:
                    print(f"# sweep budget spent: {name} {size.name} stopped after {ci} configs", file=sys.stderr)
                    break
                fn = build(cfg)
                try:
                    out = jax.jit(fn)(table, ids, x, disc)
                    ok, err = check(out, ref[form], table, ids, w if form == "plain" else w_fused, size.dtype)
                    if size.name == "decode":
                        t = time_calls(decode_loop(fn, steps, size.v), (table, ids, x, disc, h0), **timing) / steps
                    else:
                        t = time_calls(jax.jit(fn), (table, ids, x, disc), **timing)
                except Exception as e:  # a config the compiler rejects: report it, keep going
                    print(f"# {name} {size.name} {cfg_str(cfg, kernel, size)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}", file=sys.stderr)
                    continue
                if len(cfgs) > 1:
                    print(f"#   {name:13s} {size.name:8s} {cfg_str(cfg, kernel, size):32s} {t * 1e6:10.1f} us "
                          f"{'ok' if ok else 'WRONG'}", file=sys.stderr)
                if not ok:
                    all_ok = False
                if best is None or (ok, -t) > (best[3], -best[0]):
                    best = (t, cfg, err, ok)
            results[name] = best
        if a.small:
            steps_note = f"{steps} steps"
        else:
            steps_note = f"{steps}-step loop"
        for name in ("XLA plain", "XLA fused", "Pallas plain", "Pallas fused"):
            r = results.get(name)
            if r is None:
                rows.append(f"| {size.name} | {name} | failed | | | | | |")
                all_ok = False
                continue
            t, cfg, err, ok = r
            base = results.get("XLA " + name.split()[1])
            ratio = base[0] / t if base else float("nan")
            fb = floor_bytes(size)
            where = "per step, in a jitted " + steps_note if size.name == "decode" else "per call"
            cfg_txt = "" if name.startswith("XLA") else cfg_str(cfg, kernel, size)
            status = f"{'ok' if ok else 'WRONG'} ({err:.1e})"
            rows.append(f"| {size.name} N={size.n} | {name} | {t * 1e6:.1f} us {where} | {fb / t / 1e12:.3f} | "
                        f"{100 * fb / t / ceiling:.1f}% | {ratio:.2f}x | {cfg_txt} | {status} |")

    head = [
        f"Device: {dev.device_kind} ({backend}); jax {jax.__version__}; python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}; kernel: {kernel}{' (interpret mode)' if a.interpret else ''}.",
        "Copy bandwidth (read + write): " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in bw.items()) +
        f"; ceiling used: {ceiling / 1e12:.3f} TB/s.",
        f"Training size: N={train.n}, K={train.k}, D={train.d}, V={train.v}, {jnp.dtype(train.dtype).name} table; "
        f"decode size: N={decode.n}. Floor = N*(K+1)*D*itemsize bytes (K rows read per token + output written); "
        "ids uniform over V.",
        "",
        "| size | variant | time | floor TB/s | % of copy BW | vs XLA (same form) | kernel config "
        "| check (max rel err) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md = "\n".join(head + rows)
    print(md)
    print(f"\n# total {time.perf_counter() - t_start:.1f} s; correctness {'OK' if all_ok else 'FAILED'}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
