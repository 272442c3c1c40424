"""Sharding plans: AOT compilation of the rollout and train step on a simulated mesh with abstract arrays, the memory
report, the built-in model presets and the ``softgrpo plan`` command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softgrpo_jax import plan as P
from softgrpo_jax.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=2, head_dim=8, param_dtype="float32", dtype="bfloat16", remat=True)


def test_presets_match_published_sizes():
    sizes = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.777e9, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.616e9,
             "meta-llama/Llama-3.2-3B-Instruct": 3.213e9}
    for name, n in sizes.items():
        cfg = P.model_config(name)
        assert abs(cfg.num_params() - n) / n < 2e-3, (name, cfg.num_params())
    llama = P.model_config("Llama-3.2-3B-Instruct")
    assert llama.tie_word_embeddings and llama.rope_scaling.factor == 32 and llama.head_dim == 128
    with pytest.raises(P.PlanError, match="presets"):
        P.model_config("org/NoSuchModel-9B")


def test_plan_tiny_on_8_devices():
    spec = P.PlanSpec(model=TINY, mesh_shape=(2, 2, 2), rollout_rows=16, prompt_len=10, max_new_tokens=24,
                      micro_batch_size=1, mini_batch_rows=8, logprob_chunk_size=16, device_memory_gb=1.0)
    res = P.plan(spec)
    assert res["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(res["phases"]) == {"prefill", "decode", "logprobs", "update"}
    s = res["sizes"]
    assert (s["prompt_bucket"], s["train_seq_len"], s["micro_batch_rows"], s["micro_batches_per_update"],
            s["micro_batches_per_step"]) == (16, 40, 4, 2, 4)
    for name, ph in res["phases"].items():
        assert ph["arguments"] > 0 and ph["peak"] >= ph["program"] > 0, (name, ph)
    # the decode loop updates the KV cache in place: the donated cache is aliased to the output
    # k and v, bf16, split 4 ways on the batch (data x fsdp) and 2 ways on the KV heads (tensor)
    cache_bytes = 2 * TINY.num_layers * 16 * (16 + 24) * TINY.num_kv_heads * TINY.head_dim * 2 // 8
    assert res["phases"]["decode"]["aliased"] >= cache_bytes
    # the update donates params and optimizer state
    upd = res["phases"]["update"]
    assert upd["aliased"] >= res["resident"]["params"] + res["resident"]["opt_state"] - 64
    # resident bytes per device: float32 params sharded by their PartitionSpecs (fsdp x tensor where they divide)
    full = TINY.num_params() * 4
    assert full / 8 <= res["resident"]["params"] <= full
    assert res["resident"]["opt_state"] == pytest.approx(2 * res["resident"]["params"], abs=64)
    assert res["fits"] and res["peak"] < 1 << 30
    text = P.format_plan(res)
    assert "decode" in text and "fits" in text and "simulated CPU devices" in text
    # the chunked rollout: the whole budget's cache in the Pallas granule, split 4 x 2; the decode weights
    # replicated over the batch axes (split over tensor only), the policy's own copy resident beside them
    ro = res["rollout"]
    slots = 256  # 16 + 24 slots rounded up to the Pallas granule
    assert (ro["schedule"], ro["cache_slots"]) == ("chunked", slots)
    assert ro["kv_cache"] == 2 * TINY.num_layers * 16 * slots * TINY.num_kv_heads * TINY.head_dim * 2 // 8
    assert ro["decode_weights"].startswith("replicated")
    assert TINY.num_params() * 2 / 2 - 4096 <= ro["decode_weights_bytes"] <= TINY.num_params() * 2
    assert res["phases"]["decode"]["resident_besides"]["params"] == res["resident"]["params"]
    assert "KV cache" in text and "replicated over the batch axes" in text
    static = P.plan(P.PlanSpec(**{**spec.__dict__, "schedule": "static", "phases": ("decode",)}))
    assert static["rollout"]["cache_slots"] == 16 + 24
    tight = P.plan(P.PlanSpec(**{**spec.__dict__, "device_memory_gb": 1e-5, "phases": ("decode",)}))
    assert not tight["fits"] and set(tight["phases"]) == {"decode"} and "DOES NOT FIT" in P.format_plan(tight)
    assert tight["rollout"]["decode_weights"].startswith("as trained")
    # TPU (the default platform): the layer scan; the tensor axis (2) keeps the projections separate
    assert ro["decode_layout"] == "scan" and tight["rollout"]["decode_layout"] == "scan"
    # XLA:CPU's float32 copies of the bf16 decode weights (hoisted out of the loop for its dots) are not the
    # accelerator's: left out of temp, said; the update's arguments are float32, nothing to leave out there
    up = res["phases"]["decode"]["cpu_upcasts"]
    assert 0 < up <= 2 * ro["decode_weights_bytes"] and res["phases"]["update"]["cpu_upcasts"] == 0
    assert f"decode {up / 2**30:.2f} GiB" in text and "left out of temp" in text


def test_argument_upcasts_reads_float32_copies_of_bf16_arguments():
    """hlo.argument_upcasts: a float32 copy of a whole bf16 argument that a loop reads (the convert hoisted out of
    the loop, as XLA:CPU does for its bf16 dots in jax 0.10) is counted, in bytes; a float32 argument has none, and
    neither has a bf16 argument the loop reads as it is."""
    from softgrpo_jax import hlo

    loop = jax.jit(lambda w, x: jax.lax.fori_loop(
        0, 3, lambda i, x: (x @ w.astype(jnp.float32))[:, :256].astype(x.dtype), x))
    x = jnp.ones((8, 256), jnp.float32)
    w = jnp.ones((256, 512), jnp.bfloat16)
    assert hlo.argument_upcasts(loop.lower(w, x).compile().as_text()) == 4 * w.size
    assert hlo.argument_upcasts(loop.lower(w.astype(jnp.float32), x).compile().as_text()) == 0
    assert hlo.argument_upcasts(jax.jit(lambda w: w * 2).lower(w).compile().as_text()) == 0


def test_plan_takes_the_engines_decode_layout():
    """On GPU the engine decodes per layer with fused projections where its weights are replicated for decoding,
    and with the layer scan where they stay FSDP shards (per-layer weights' gathers would be hoisted out of the
    loop: every layer's weights at once). The plan compiles what the engine runs: the per-layer program's prefill
    and decode (with a per-layer cache) compile and count the same KV cache."""
    spec = P.PlanSpec(model=TINY, mesh_shape=(1, 8, 1), rollout_rows=16, prompt_len=10, max_new_tokens=24,
                      micro_batch_size=1, mini_batch_rows=8, logprob_chunk_size=16, device_memory_gb=1.0,
                      phases=("prefill", "decode"), platform="gpu")
    gpu = P.plan(spec)
    tight = P.plan(P.PlanSpec(**{**spec.__dict__, "device_memory_gb": 1e-5}))
    tpu = P.plan(P.PlanSpec(**{**spec.__dict__, "platform": "tpu"}))
    assert gpu["rollout"]["decode_weights"].startswith("replicated")
    assert gpu["rollout"]["decode_layout"] == "per_layer, fused projections"
    assert tight["rollout"]["decode_weights"].startswith("as trained")
    assert tight["rollout"]["decode_layout"] == "scan, fused projections"  # bf16 compute of float32 weights: a copy
    assert tpu["rollout"]["decode_layout"] == "scan, fused projections"
    assert gpu["rollout"]["kv_cache"] == tpu["rollout"]["kv_cache"] > 0
    assert gpu["phases"]["decode"]["aliased"] >= gpu["rollout"]["kv_cache"]  # the per-layer cache, donated
    assert "(per_layer, fused projections)" in P.format_plan(gpu)
    # waves (rollout.max_rows_per_device): half the rows at a time, half the cache, the same layout
    waves = P.plan(P.PlanSpec(**{**spec.__dict__, "max_rows_per_device": 1}))
    assert (waves["rollout"]["waves"], waves["rollout"]["rows_per_wave"], gpu["rollout"]["waves"]) == (2, 8, 1)
    assert waves["rollout"]["kv_cache"] == gpu["rollout"]["kv_cache"] // 2
    assert waves["phases"]["decode"]["arguments"] < gpu["phases"]["decode"]["arguments"]
    assert "2 waves of up to 8 rows" in P.format_plan(waves)
    assert P.device_platform("h100") == "gpu" and P.device_platform("v5e") == "tpu" and P.device_platform(None) is None


def test_plan_rejects_indivisible_batch():
    spec = P.PlanSpec(model=TINY, mesh_shape=(1, 8, 1), rollout_rows=16, prompt_len=8, max_new_tokens=8,
                      micro_batch_size=2, mini_batch_rows=8)
    with pytest.raises(P.PlanError, match="micro-batches"):
        P.plan(spec)


def test_fsdp_shards_activations_in_the_update():
    """Activations stay batch-sharded under FSDP (distributed.constrain_batch): doubling the fsdp axis at a fixed
    per-device batch must not grow the update's temporaries (it did, ~2x, when GSPMD replicated the batch)."""
    kw = dict(model=TINY.replace(vocab_size=2048), prompt_len=16, max_new_tokens=48, micro_batch_size=2,
              logprob_chunk_size=None, phases=("update",))
    r4 = P.plan(P.PlanSpec(mesh_shape=(1, 4, 1), rollout_rows=16, mini_batch_rows=8, **kw),
                devices=jax.devices()[:4])
    r8 = P.plan(P.PlanSpec(mesh_shape=(1, 8, 1), rollout_rows=32, mini_batch_rows=16, **kw))
    t4, t8 = r4["phases"]["update"]["temporaries"], r8["phases"]["update"]["temporaries"]
    assert t8 < 1.25 * t4, (t4, t8)


def test_plan_command(tmp_path):
    from helpers import make_hf_model

    mdir = str(tmp_path / "m")
    make_hf_model(mdir, "llama", seed=0)
    out = str(tmp_path / "plan.json")
    from helpers import FAST_COMPILE

    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=FAST_COMPILE)  # `plan` sets the simulated device count
    cmd = [sys.executable, "-m", "softgrpo_jax.cli", "plan", "--config", "configs/demo_smollm2_smoke.py",
           "--mesh", "1,4,1", "--device-memory-gb", "2", "--json", out, f"--config.model.path={mdir}",
           "--config.rl.micro_batch_size=1", "--config.data.max_prompt_length=32"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "fits" in p.stdout and "'fsdp': 4" in p.stdout
    res = json.load(open(out))
    assert res["mesh"]["fsdp"] == 4 and res["sizes"]["rollout_rows"] == 4 and res["fits"]
    assert np.isfinite(res["peak"]) and res["model"]["family"] == "llama"
    # a mistyped key fails with the config's message, not a traceback
    p = subprocess.run(cmd[:-1] + ["--config.rl.micro_batch=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "unknown config key" in p.stderr


def test_one_device_plan_traces_the_accelerator_paths(monkeypatch):
    """A one-device plan on a CPU host compiles the accelerator's program: none of XLA:CPU's own paths (the
    attention block, the MLP over token tiles, the vocabulary head in blocks) is traced; without
    ``accelerator_paths`` the same plan does trace them (the traps below fire)."""
    import contextlib

    from softgrpo_jax import plan as plan_module
    from softgrpo_jax.models import transformer as T
    from softgrpo_jax.ops import vocab_logprobs as VL
    from softgrpo_jax.ops.tuning import Tuning

    def trap(*a, **k):
        raise AssertionError("an XLA:CPU-only path was traced")

    monkeypatch.setattr(T.attention_block, "attention_block", trap)
    monkeypatch.setattr(T.mlp, "swiglu_mlp", trap)
    blocks, vocab_block = [], VL.vocab_block
    monkeypatch.setattr(VL, "vocab_block", lambda v: blocks.append(vocab_block(v)) or blocks[-1])
    spec = P.PlanSpec(model=TINY.replace(vocab_size=4096), mesh_shape=(1, 1, 1), rollout_rows=4, prompt_len=8,
                      max_new_tokens=8, micro_batch_size=2, mini_batch_rows=4, logprob_chunk_size=None,
                      phases=("logprobs", "update"))
    res = P.plan(spec, devices=jax.devices()[:1])
    assert res["phases"]["update"]["temporaries"] > 0
    assert blocks and set(blocks) == {4096}  # one block of the whole vocabulary
    assert vocab_block(4096) == Tuning().vocab_block[1] < 4096  # outside the context: blocks
    monkeypatch.setattr(plan_module, "accelerator_paths", contextlib.nullcontext)
    with pytest.raises(AssertionError, match="XLA:CPU-only"):
        P.plan(spec, devices=jax.devices()[:1])
