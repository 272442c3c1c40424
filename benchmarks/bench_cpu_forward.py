"""Forward (prefill) throughput of SmolLM2-135M on CPU: this project (jitted JAX) vs transformers (PyTorch), side by
side in one run, same weights (the embedded GGUF, dequantised), same batch, lengths and token ids.

    python benchmarks/bench_cpu_forward.py                      # default shapes 1x128, 4x256
    python benchmarks/bench_cpu_forward.py --shapes 16x256 --repeats 3
    python benchmarks/bench_cpu_forward.py --small              # 1x16, one repeat, jax-f32-scan and torch-f32

Each variant computes full float32 logits [B, T, V] for the whole batch (what a trainer's log-prob pass needs).
Timings are the median (and best) of ``--repeats`` calls after one warm-up (compile) call; variants are interleaved
per repeat, so load from other processes on a shared machine hits them alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def jax_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return lambda ids: fwd(state, ids).block_until_ready()


def torch_forward(tmodel):
    import torch

    def run(ids):
        with torch.inference_mode():
            return tmodel(ids).logits.float()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated BATCHxLENGTH list (default 1x128,4x256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 3)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of: jax-f32-scan, jax-f32-unrolled, jax-bf16, torch-f32, torch-bf16 "
                    "(default: all)")
    ap.add_argument("--small", action="store_true",
                    help="a smoke run: shape 1x16, one repeat, variants jax-f32-scan and torch-f32 (each unless given)")
    args = ap.parse_args()
    small = dict(shapes="1x16", repeats=1, variants="jax-f32-scan,torch-f32")
    full = dict(shapes="1x128,4x256", repeats=3, variants="jax-f32-scan,jax-f32-unrolled,jax-bf16,torch-f32,torch-bf16")
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import torch
    import transformers

    from softgrpo_jax.checkpoint.embedded import smollm2_gguf_path
    from softgrpo_jax.checkpoint.gguf import load_gguf
    from softgrpo_jax.checkpoint.hf import iter_model_tensors

    path = smollm2_gguf_path()
    variants = args.variants.split(",")
    t0 = time.perf_counter()
    base = load_gguf(path)
    load_s = time.perf_counter() - t0

    runners = {}
    if "jax-f32-scan" in variants:
        runners["jax-f32-scan"] = (jax_forward(base), "jax")
    if "jax-f32-unrolled" in variants:
        runners["jax-f32-unrolled"] = (jax_forward(load_gguf(path, scan_layers=False)), "jax")
    if "jax-bf16" in variants:
        runners["jax-bf16"] = (jax_forward(load_gguf(path, dtype="bfloat16")), "jax")
    if any(v.startswith("torch") for v in variants):
        cfg = transformers.LlamaConfig(**base.config.to_hf())
        tm = transformers.LlamaForCausalLM(cfg).eval()
        sd = {k: torch.from_numpy(np.array(v)) for k, v in iter_model_tensors(base)}
        tm.load_state_dict(sd, strict=False)
        tm.tie_weights()
        if "torch-f32" in variants:
            runners["torch-f32"] = (torch_forward(tm), "torch")
        if "torch-bf16" in variants:
            import copy

            runners["torch-bf16"] = (torch_forward(copy.deepcopy(tm).to(torch.bfloat16)), "torch")

    print(f"# SmolLM2-135M forward on {cpu_name()} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"# load_gguf: {load_s:.1f} s; load average before: {os.getloadavg()[0]:.2f}\n")
    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        B, T = map(int, shape.lower().split("x"))
        ids_np = rng.integers(0, base.config.vocab_size, size=(B, T), dtype=np.int32)
        inputs = {"jax": jnp.asarray(ids_np), "torch": torch.from_numpy(ids_np.astype(np.int64))}
        first, times = {}, {k: [] for k in runners}
        outs = {}
        for name, (fn, kind) in runners.items():
            t = time.perf_counter()
            outs[name] = fn(inputs[kind])
            first[name] = time.perf_counter() - t
        if "jax-f32-scan" in outs and "torch-f32" in outs:  # same weights, same logits (sanity check)
            diff = np.abs(np.asarray(outs["jax-f32-scan"]) - outs["torch-f32"].numpy()).max()
            print(f"# {B}x{T}: max |logits jax-f32 - torch-f32| = {diff:.2e}", flush=True)
        del outs
        for _ in range(args.repeats):
            for name, (fn, kind) in runners.items():
                t = time.perf_counter()
                fn(inputs[kind])
                times[name].append(time.perf_counter() - t)
        ref = statistics.median(times["torch-f32"]) if "torch-f32" in times else None
        for name in runners:
            med = statistics.median(times[name])
            rows.append((f"{B}x{T}", name, first[name], min(times[name]), med, B * T / med,
                         ref / med if ref else float("nan")))
        print(f"# done {B}x{T}", flush=True)

    print(f"\n# load average after: {os.getloadavg()[0]:.2f}")
    print("\n| batch x length | implementation | first call (s) | best (s) | median (s) | tokens/s (median) "
          "| speed vs torch-f32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, name, f, best, med, tps, ratio in rows:
        print(f"| {shape} | {name} | {f:.2f} | {best:.3f} | {med:.3f} | {tps:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
