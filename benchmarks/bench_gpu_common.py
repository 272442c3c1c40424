"""Shared pieces of the GPU benchmarks (bench_gpu_decode.py, bench_gpu_train.py).

Imports only jax, flax, numpy, torch, transformers and the project's model / checkpoint modules (no ml_collections,
math-verify, TFDS, gguf or reasoning-gym: the GPU machines lack them). JAX must not preallocate GPU memory, since
torch runs in the same process: the benchmarks set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` before importing jax.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the same process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from softgrpo_jax.checkpoint.hf import iter_model_tensors  # noqa: E402
from softgrpo_jax.models import ModelConfig, Transformer  # noqa: E402

# Qwen2.5-1.5B-shaped (the DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-Math-1.5B layout: untied head, 1.78B params)
QWEN_1P5B = dict(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=131072)
TINY = dict(family="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            qkv_bias=True, max_position_embeddings=4096)


def block(x):
    return jax.block_until_ready(x)


def machine_line() -> str:
    d = jax.devices()[0]
    try:
        import torch

        tv = torch.__version__
        tdev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        tv, tdev = "absent", "-"
    try:
        import transformers

        trv = transformers.__version__
    except Exception:  # noqa: BLE001
        trv = "absent"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device {d.device_kind} "
            f"({d.platform}) x{jax.local_device_count()}; torch device {tdev}; jax {jax.__version__}, torch {tv}, "
            f"transformers {trv}, python {platform.python_version()}")


def best_time(fn, reps: int = 3) -> float:
    """Best of ``reps`` wall times of ``fn()`` (which must block until its work is done)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes: int) -> dict[str, float]:
    """Bytes moved (read + write) per second by a device-to-device copy: jitted jax copy, and torch's copy_ when torch
    sees a GPU. The larger is the ceiling for bandwidth utilisation."""
    out = {}
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 0.0)  # a copy XLA cannot elide
    block(f(x))
    t = best_time(lambda: block(f(x)), reps=5)
    out["jax copy"] = 2 * nbytes / t
    del x
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)
            dst.copy_(src)
            torch.cuda.synchronize()

            def run():
                dst.copy_(src)
                torch.cuda.synchronize()

            out["torch copy_"] = 2 * nbytes / best_time(run, reps=5)
            del src, dst
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        print(f"# torch copy skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def matmul_rate(n: int, dtype=jnp.bfloat16) -> dict[str, float]:
    """FLOP/s of an n^3 matmul, jax and torch (bf16 on GPU, float32 on CPU)."""
    out = {}
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    block(f(a, a))
    out["jax matmul"] = 2 * n ** 3 / best_time(lambda: block(f(a, a)), reps=5)
    del a
    try:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        td = torch.bfloat16 if dev == "cuda" else torch.float32
        ta = torch.ones((n, n), dtype=td, device=dev)
        ta @ ta

        def run():
            ta @ ta
            if dev == "cuda":
                torch.cuda.synchronize()

        out["torch matmul"] = 2 * n ** 3 / best_time(run, reps=5)
        del ta
    except Exception as e:  # noqa: BLE001
        print(f"# torch matmul skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def make_model(shape: dict, dtype: str, *, remat: bool = False, seed: int = 0) -> Transformer:
    """A random model (weights ~ N(0, 0.02), norms 1, biases small) of ``shape`` in ``dtype``, on the default device."""
    cfg = ModelConfig(**shape, param_dtype=dtype, dtype=dtype, remat=remat, scan_layers=True)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def torch_model_from(model: Transformer, *, device: str, attn: str = "sdpa"):
    """The same weights in transformers' PyTorch class (the peer), in the model's dtype on ``device``."""
    import ml_dtypes
    import torch
    import transformers

    cfg = model.config
    hf = cfg.to_hf()
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.param_dtype]
    conf = transformers.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items()
                                                                     if k not in ("torch_dtype", "dtype")})
    conf._attn_implementation = attn
    with torch.device(device):
        tm = transformers.AutoModelForCausalLM.from_config(conf, dtype=tdt, attn_implementation=attn)
    state = {}
    for name, arr in iter_model_tensors(model):
        arr = np.ascontiguousarray(arr)
        if arr.dtype == ml_dtypes.bfloat16:
            t = torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(arr.copy())
        state[name] = t
    missing, unexpected = tm.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    return tm.to(device).eval()


def weight_bytes(model: Transformer, *, exclude_input_embedding: bool = True) -> int:
    """Bytes of the weights a decode step reads: everything but the input embedding table (only K rows of it are
    read per token; with tied embeddings the table is read whole by the output head and counts)."""
    cfg = model.config
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if exclude_input_embedding and not cfg.tie_word_embeddings:
        total -= cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize
    return total


def fmt_rate(x: float, unit: str) -> str:
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= p:
            return f"{x / p:.2f} {s}{unit}"
    return f"{x:.2f} {unit}"


def emit_report(report: str, out: str | None, ok: bool) -> int:
    """Print the markdown report, also write it to ``out`` if given; the exit status (0 when every check passed)."""
    print("\n" + report)
    if out:
        with open(out, "w") as f:
            f.write(report + "\n")
    return 0 if ok else 1
