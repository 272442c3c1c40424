"""Sharding plans: compile a run's programs ahead of time on a mesh, with abstract arrays, and read XLA's memory
analysis per device against the device's memory.

No weights are read or allocated: the model is built with ``nnx.eval_shape`` from a ``ModelConfig`` (read from a model
path's metadata, or one of the built-in :data:`PRESETS` of the seed's models), every input is a
``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``, and the very jitted functions a run uses are lowered and
compiled: the rollout's prefill and decode loop (``sampling.engine``), the old/reference log-prob pass and the
optimiser update (``rl.trainer``). ``compiled.memory_analysis()`` then gives, per device, the bytes of the program's
arguments, outputs, aliased (donated) buffers and temporaries.

A phase's peak per device is the program's own footprint (arguments + outputs - aliased + temporaries) plus what
stays resident beside it and is not one of its arguments: the optimizer state and the reference weights during the
rollout, the whole step's micro-batches and log-probs during the updates, and so on (:func:`plan`).

On a machine without the accelerator, the mesh is simulated with CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which ``softgrpo plan`` sets itself): the partitioning
(GSPMD) is the accelerator's, but the CPU compiler's fusion and buffer assignment stand in for the GPU's or TPU's,
so the figures are estimates of the accelerator's (the temporaries above all). One CPU artefact is taken out:
XLA:CPU runs bf16 dots on float32 copies of their operands, and hoists the copies of loop-invariant weights out of
the decode loop (a float32 copy of every weight, up to 26 GiB per device for a 7B under the layer scan), which GPUs
and TPUs never make; ``hlo.argument_upcasts`` finds them and the plan reports them apart. Run it on the real devices
(``--local-devices``) for the compiler's own numbers.

Importable without ml_collections (``softgrpo_jax.config`` is only used by :func:`spec_from_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import AXES, BATCH_AXES, fit_spec, make_mesh
from softgrpo_jax.hlo import argument_upcasts
from softgrpo_jax.models.config import ModelConfig, resolve_compute_dtype
from softgrpo_jax.models.transformer import FUSED, Transformer, init_cache
from softgrpo_jax.ops.tuning import accelerator_paths

GiB = 1024 ** 3

# Public config.json values of the seed's models (transcribed; no weights needed). A local HF directory's own
# config.json always wins over these.
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-r1-distill-qwen-1.5b": dict(  # Qwen2.5-Math-1.5B shape, untied head: 1.78B parameters
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643, use_sliding_window=False),
    "deepseek-r1-distill-qwen-7b": dict(  # Qwen2.5-Math-7B shape: 7.62B parameters
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151646, eos_token_id=151643, use_sliding_window=False),
    "llama-3.2-3b-instruct": dict(  # 3.21B parameters, tied embeddings, llama3 RoPE scaling
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], attention_bias=False, mlp_bias=False),
}
PRESET_ALIASES = {
    "qwen2.5-1.5b-untied": "deepseek-r1-distill-qwen-1.5b",
    "qwen2.5-math-1.5b": "deepseek-r1-distill-qwen-1.5b",
    "qwen2.5-math-7b": "deepseek-r1-distill-qwen-7b",
    "llama-3.2-3b": "llama-3.2-3b-instruct",
}

# Usable memory per device, GiB (what the runtime reports as its limit is a little lower).
DEVICES = {"h100": 80, "h200": 141, "a100": 80, "a100-40g": 40, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def device_platform(device: str | None) -> str | None:
    """"gpu" or "tpu" for a :data:`DEVICES` name (None: not known)."""
    if not device:
        return None
    return "tpu" if device.startswith("v") else "gpu"


class PlanError(ValueError):
    pass


def preset_config(name: str) -> dict:
    key = os.path.basename(name.rstrip("/")).lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise PlanError(f"no built-in model config for {name!r}; presets: {sorted(PRESETS)} (aliases "
                        f"{sorted(PRESET_ALIASES)}), or pass a local HF directory with a config.json")
    return dict(PRESETS[key])


def model_config(path: str, *, param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                 scan_layers: bool = True, remat: bool = False) -> ModelConfig:
    """A ModelConfig from the metadata of any model path ``load_pretrained`` takes (an HF directory's config.json, a
    GGUF file, an orbax export, a run's kept step, the embedded default); else from the preset named by the path's
    last part (``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B`` -> ``deepseek-r1-distill-qwen-7b``).
    No weight is read."""
    from softgrpo_jax.checkpoint.api import EMBEDDED_ALIASES
    from softgrpo_jax.checkpoint.api import model_config as checkpoint_model_config

    # a plan is for an accelerator mesh: "auto" is bfloat16 there, whatever this host's CPU
    dtype = resolve_compute_dtype(compute_dtype, backend="gpu")
    if path in EMBEDDED_ALIASES or os.path.exists(path):
        return checkpoint_model_config(path, dtype=param_dtype, compute_dtype=dtype, scan_layers=scan_layers,
                                       remat=remat)
    return ModelConfig.from_hf(preset_config(path), param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers,
                               remat=remat)


def bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """Sizes of one training step (defaults: the seed's 1.5B run)."""

    model: ModelConfig
    mesh_shape: tuple[int, int, int] = (1, -1, 1)
    rollout_rows: int = 512  # train_batch_size x group_size: rows of one generate call
    prompt_len: int = 1024  # max prompt length (bucketed as the engine buckets it)
    max_new_tokens: int = 8192
    max_topk: int = 5
    micro_batch_size: int = 2  # sequences per data-parallel device per micro-batch
    mini_batch_rows: int = 256  # mini_batch_size x group_size: rows of one optimiser update
    logprob_chunk_size: int | None = 1024
    use_kl_loss: bool = True
    embed_impl: str = "xla"
    device_memory_gb: float = 80.0
    phases: tuple[str, ...] = ("prefill", "decode", "logprobs", "update")
    group_size: int = 8  # rows per prompt: the chunked schedule prefills each prompt once
    schedule: str = "chunked"  # the rollout engine's (rollout.schedule)
    chunk_steps: int = 128
    rollout_layout: str = "auto"  # the engine's (rollout.layout): auto is per-layer on GPU, the layer scan on TPU
    platform: str = "tpu"  # "gpu" | "tpu": where the plan's run decodes (rollout.layout auto)
    fuse_projections: bool = True  # the engine's fused q/k/v and gate/up in its decode copy (rollout.*)
    max_rows_per_device: int = 0  # the engine's waves (rollout.max_rows_per_device; 0: its automatic rule)
    sampling: Any = None  # a SamplingConfig; None: the SofT-GRPO training rollout defaults
    loss: Any = None  # a LossConfig; None: defaults with logprob_chunk_size

    @property
    def prompt_bucket(self) -> int:
        return bucket(self.prompt_len)

    @property
    def seq_len(self) -> int:
        """Trainer sequence length: prompt bucket + the response bucket that holds the longest response."""
        return self.prompt_bucket + min(self.max_new_tokens, bucket(self.max_new_tokens))


def spec_from_config(cfg, *, mesh_shape=None, device_memory_gb: float = 80.0, phases=None,
                     platform: str | None = None) -> PlanSpec:
    """A PlanSpec from a run's ml-collections config (``softgrpo train --config ...``); ``platform`` ("gpu" |
    "tpu", None: not known, planned as TPU's) picks the decode layout the engine takes there
    (``rollout.layout``)."""
    from softgrpo_jax.config import loss_config, sampling_config

    mc = cfg.model
    model = model_config(mc.path, param_dtype=mc.param_dtype, compute_dtype=mc.compute_dtype,
                         scan_layers=mc.scan_layers, remat=mc.remat)
    rl = cfg.rl
    samp = sampling_config(cfg.rollout)
    if rl.algorithm == "grpo":
        samp = dataclasses.replace(samp, mode="discrete")
    kw = {}
    if phases:
        kw["phases"] = tuple(phases)
    return PlanSpec(model=model, mesh_shape=tuple(mesh_shape or cfg.trainer.mesh),
                    rollout_rows=rl.train_batch_size * rl.group_size, prompt_len=cfg.data.max_prompt_length,
                    max_new_tokens=cfg.rollout.max_new_tokens, max_topk=cfg.rollout.max_topk,
                    micro_batch_size=rl.micro_batch_size, mini_batch_rows=rl.mini_batch_size * rl.group_size,
                    logprob_chunk_size=rl.logprob_chunk_size or None, use_kl_loss=rl.use_kl_loss,
                    device_memory_gb=device_memory_gb, sampling=samp, group_size=rl.group_size,
                    schedule=cfg.rollout.schedule, chunk_steps=cfg.rollout.chunk_steps,
                    rollout_layout=cfg.rollout.layout, platform=platform or "tpu",
                    fuse_projections=bool(cfg.rollout.fuse_projections),
                    max_rows_per_device=cfg.rollout.max_rows_per_device,
                    loss=loss_config(rl, noise=cfg.rollout.noise), **kw)


# ------------------------------------------------------------------------------------------------------ helpers
def _sds(shape, dtype, mesh, spec=None) -> jax.ShapeDtypeStruct:
    spec = P() if spec is None else fit_spec(shape, spec, mesh)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def _abstract_cache(dcfg, B: int, S: int, mesh, per_layer: bool) -> dict:
    """The engine's KV cache for ``B`` rows of ``S`` slots as sharded ``ShapeDtypeStruct`` s: rows over the batch
    axes, KV heads over ``tensor``; stacked [L, B, Hkv, S, hd] or per-layer lists."""
    cache = jax.eval_shape(lambda: init_cache(dcfg, B, S, per_layer=per_layer))
    kv = P(BATCH_AXES, "tensor", None, None) if per_layer else P(None, BATCH_AXES, "tensor", None, None)
    return {k: (jax.tree.map(lambda a: _sds(a.shape, a.dtype, mesh, kv), v) if k in ("k", "v") else
                _batch(v.shape, v.dtype, mesh) if v.ndim else _sds(v.shape, v.dtype, mesh)) for k, v in cache.items()}


def _decode_tree(ptree, mesh, *, per_layer: bool, fuse: bool):
    """The abstract weights (stacked ``ShapeDtypeStruct`` s with shardings) as the engine's decode copy holds them:
    split per layer, each weight keeping its own split of the stack's sharding, and with ``fuse`` the fused
    projections (``models.transformer.fuse_projections``: the parts' sharding, the output dims summed)."""
    layers = ptree["layers"]
    n = next(iter(layers.values())).shape[0]

    def one(drop: bool):
        out = {}
        for k, a in layers.items():
            spec = tuple(a.sharding.spec) + (None,) * (len(a.shape) - len(a.sharding.spec))
            out[k] = _sds(a.shape[1:], a.dtype, mesh, P(*spec[1:])) if drop else a
        for name, parts in FUSED.items() if fuse else ():
            if all(k in out for k in parts):
                xs = [out.pop(k) for k in parts]
                shape = xs[0].shape[:-1] + (sum(x.shape[-1] for x in xs),)
                out[name] = _sds(shape, xs[0].dtype, mesh, xs[0].sharding.spec)
        return out

    return {**ptree, "layers": [one(True) for _ in range(n)] if per_layer else one(False)}


def _batch(shape, dtype, mesh, lead: int = 0):
    """Batch-sharded abstract array: dim ``lead`` over the data-parallel axes."""
    spec = P(*([None] * lead), BATCH_AXES, *([None] * (len(shape) - lead - 1)))
    return _sds(shape, dtype, mesh, spec)


def abstract_params(cfg: ModelConfig, mesh):
    """(graphdef, state of ShapeDtypeStructs sharded by each Param's PartitionSpec); nothing is allocated."""
    model = nnx.eval_shape(lambda: Transformer(cfg, abstract=True))
    graphdef, state = nnx.split(model)

    def f(v):
        val = v.get_value()
        sh = NamedSharding(mesh, fit_spec(val.shape, v.get_metadata().get("pspec", P()), mesh))
        return v.replace(jax.ShapeDtypeStruct(val.shape, val.dtype, sharding=sh))

    return graphdef, jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_opt_state(tx, params, mesh):
    """optax state of abstract params: params-shaped subtrees (moments) follow the params' shardings, the rest
    (step counts) is replicated, as PolicyState places it."""
    opt = jax.eval_shape(tx.init, params)
    td = jax.tree.structure(params)
    rep = NamedSharding(mesh, P())

    def place(sub):
        if jax.tree.structure(sub) == td:
            return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), sub,
                                params)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), sub)

    return jax.tree.map(place, opt, is_leaf=lambda x: jax.tree.structure(x) == td)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded abstract (or real) arrays: the largest shard's."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _memory(compiled, *, on_cpu: bool = False) -> dict[str, int]:
    """Per-device bytes of a compiled program. ``on_cpu``: compiled by XLA:CPU standing in for an accelerator; its
    float32 copies of whole bf16 arguments (``hlo.argument_upcasts``: how XLA:CPU runs bf16 dots) are left out of
    the temporaries and reported as ``cpu_upcasts``."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise PlanError("this backend gives no memory analysis")
    if isinstance(ma, (list, tuple)):
        ma = ma[0]
    g = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
    d = dict(arguments=g("argument_size_in_bytes"), outputs=g("output_size_in_bytes"),
             aliased=g("alias_size_in_bytes"), temporaries=g("temp_size_in_bytes"),
             code=g("generated_code_size_in_bytes"))
    d["cpu_upcasts"] = min(argument_upcasts(compiled.as_text()), d["temporaries"]) if on_cpu else 0
    d["temporaries"] -= d["cpu_upcasts"]
    d["program"] = d["arguments"] + d["outputs"] - d["aliased"] + d["temporaries"]
    return d


# ------------------------------------------------------------------------------------------------------ plan
def plan(spec: PlanSpec, *, mesh=None, devices=None, log=None) -> dict:
    """Compile the step's programs for ``spec`` on ``mesh`` and return per-device memory per phase (bytes).

    Result: ``{"mesh", "devices", "model", "sizes", "resident", "phases": {name: {...}}, "peak", "fits"}``.
    Traced under ``ops.tuning.accelerator_paths``: a one-device mesh of a CPU host plans the accelerator's
    program, not XLA:CPU's tiled one.
    """
    with accelerator_paths():
        return _plan(spec, mesh=mesh, devices=devices, log=log)


def _plan(spec: PlanSpec, *, mesh=None, devices=None, log=None) -> dict:
    import optax

    from softgrpo_jax.rl.objective import LossConfig
    from softgrpo_jax.rl.trainer import UpdateSettings, make_logprob_fn, make_optimizer, make_update_fn
    from softgrpo_jax.sampling.engine import _reshape_batch, decode, init_state, prefill
    from softgrpo_jax.sampling.layout import (decode_per_layer, decode_weight_sharding, replicated_weights_fit,
                                              rollout_waves, sharded_over_batch, wave_prompts)
    from softgrpo_jax.sampling.step import SamplingConfig

    log = log or (lambda m: None)
    mesh = mesh or make_mesh(spec.mesh_shape, devices=devices)
    cfg = spec.model
    n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
    B = spec.rollout_rows
    Pn = spec.prompt_bucket
    L = spec.max_new_tokens
    K = spec.max_topk
    T = spec.seq_len
    mb = spec.micro_batch_size * n_dp
    if spec.mini_batch_rows % mb or B % spec.mini_batch_rows:
        raise PlanError(f"a mini-batch of {spec.mini_batch_rows} rows does not split into micro-batches of {mb} "
                        f"({spec.micro_batch_size} per data-parallel device x {n_dp}), or {B} rollout rows into "
                        f"mini-batches")
    n_micro = spec.mini_batch_rows // mb
    n_all = B // mb
    samp = spec.sampling or SamplingConfig(max_new_tokens=L, max_topk=K)
    samp = dataclasses.replace(samp, max_new_tokens=L, max_topk=K)
    loss_cfg = spec.loss or LossConfig(chunk_size=spec.logprob_chunk_size)
    loss_cfg = dataclasses.replace(loss_cfg, chunk_size=spec.logprob_chunk_size)

    graphdef, params = abstract_params(cfg, mesh)
    tx = make_optimizer(1e-6)
    opt = abstract_opt_state(tx, params, mesh)
    b_params, b_opt = per_device_bytes(params), per_device_bytes(opt)
    b_ref = b_params if spec.use_kl_loss else 0
    out: dict[str, Any] = dict(
        mesh=dict(mesh.shape), devices=f"{len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}",
        platform=mesh.devices.flat[0].platform,
        model=dict(family=cfg.family, params=cfg.num_params(), layers=cfg.num_layers, hidden=cfg.hidden_size,
                   vocab=cfg.vocab_size, param_dtype=cfg.param_dtype, compute_dtype=cfg.dtype, remat=cfg.remat,
                   scan_layers=cfg.scan_layers),
        sizes=dict(rollout_rows=B, prompt_bucket=Pn, max_new_tokens=L, K=K, train_seq_len=T, micro_batch_rows=mb,
                   micro_batches_per_update=n_micro, micro_batches_per_step=n_all,
                   logprob_chunk_size=spec.logprob_chunk_size),
        resident=dict(params=b_params, ref_params=b_ref, opt_state=b_opt),
        device_memory=int(spec.device_memory_gb * GiB), phases={})
    f32, i32 = jnp.float32, jnp.int32

    # rollout buffers that outlive the decode call (Rollout fields), per device
    roll = dict(tokens=_batch((B, L), i32, mesh), mask=_batch((B, L), bool, mesh),
                ids=_batch((B, L, K), i32, mesh), ytil=_batch((B, L, K), f32, mesh),
                weights=_batch((B, L, K), f32, mesh), soft=_batch((B, L), bool, mesh),
                logprob=_batch((B, L), f32, mesh), prompt=_batch((B, Pn), i32, mesh),
                kept=_batch((B, L, K), bool, mesh), clamped=_batch((B, L, K), bool, mesh))
    b_roll = per_device_bytes(roll)

    def batch_abs(n):
        shp = lambda *s: (n, mb) + s  # noqa: E731
        return dict(tokens=_batch(shp(T), i32, mesh, 1), attention_mask=_batch(shp(T), bool, mesh, 1),
                    topk_ids=_batch(shp(T, K), i32, mesh, 1), topk_ytil=_batch(shp(T, K), f32, mesh, 1),
                    soft_mask=_batch(shp(T), bool, mesh, 1), loss_mask=_batch(shp(T), bool, mesh, 1),
                    advantages=_batch(shp(), f32, mesh, 1), tau=_batch(shp(), f32, mesh, 1),
                    topk_kept=_batch(shp(T, K), bool, mesh, 1), topk_clamped=_batch(shp(T, K), bool, mesh, 1))

    all_mb = batch_abs(n_all)
    all_lp = _batch((n_all, mb, T), f32, mesh, 1)
    b_all_mb, b_all_lp = per_device_bytes(all_mb), per_device_bytes(all_lp)

    def record(name, compiled, resident_extra: dict[str, int], t):
        m = _memory(compiled, on_cpu=out["platform"] == "cpu")
        m["resident_besides"] = dict(resident_extra)
        m["peak"] = m["program"] + sum(resident_extra.values())
        m["compile_s"] = round(t, 1)
        out["phases"][name] = m
        up = f", CPU-only upcasts {m['cpu_upcasts'] / GiB:.2f} left out" if m["cpu_upcasts"] else ""
        log(f"{name}: program {m['program'] / GiB:.2f} GiB (args {m['arguments'] / GiB:.2f}, out "
            f"{m['outputs'] / GiB:.2f}, aliased {m['aliased'] / GiB:.2f}, temp {m['temporaries'] / GiB:.2f}{up}) + "
            f"resident {sum(resident_extra.values()) / GiB:.2f} = {m['peak'] / GiB:.2f} GiB  [{t:.0f} s]")

    # the rollout as the engine runs it on the accelerator: weights in the compute dtype, per layer (GPU) or
    # stacked (TPU), q/k/v and gate/up fused, laid out for decoding (replicated over the batch axes where that
    # copy fits), the Pallas decode attention's cache granule
    chunked = spec.schedule == "chunked"
    C = min(spec.chunk_steps, L)
    granule = 256
    cache_len = -(-(Pn + L) // granule) * granule if chunked else Pn + L
    dcfg = cfg.replace(param_dtype=cfg.dtype)
    ptree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, cfg.jnp_dtype, sharding=a.sharding),
                         nnx.to_pure_dict(params))
    w_bytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(ptree))
    b_kv = per_device_bytes(tuple(_abstract_cache(dcfg, B, cache_len, mesh, False)[k] for k in ("k", "v")))
    # the engine's rules, with what the run holds beside the rollout (the policy, its reference and optimizer
    # state): replicated decode weights where they fit, the layout that goes with them
    sharded = sharded_over_batch(ptree, mesh)
    replicated = sharded and replicated_weights_fit(w_bytes, mesh, out["device_memory"],
                                                    b_kv + b_params + b_ref + b_opt)
    # waves: a share of the prompts at a time where that lets the weights replicate (rollout.max_rows_per_device)
    rows_pd, Bw = -(-B // n_dp), B
    if spec.max_rows_per_device:
        waves = -(-rows_pd // spec.max_rows_per_device)
    else:
        waves = rollout_waves(w_bytes, rows_pd, b_kv // rows_pd, mesh, out["device_memory"],
                              b_params + b_ref + b_opt, sharded=sharded)
    if waves > 1:  # the engine's split: whole groups, a multiple of the batch devices where that keeps the count
        # the largest wave's rows: the decode's shapes below
        Bw = wave_prompts(B // spec.group_size, waves, n_dp) * spec.group_size
        b_kv = per_device_bytes(tuple(_abstract_cache(dcfg, Bw, cache_len, mesh, False)[k] for k in ("k", "v")))
        replicated = sharded and replicated_weights_fit(w_bytes, mesh, out["device_memory"],
                                                        b_kv + b_params + b_ref + b_opt)
    per_layer = decode_per_layer(spec.rollout_layout, spec.platform, sharded and not replicated)
    fuse = spec.fuse_projections and mesh.shape["tensor"] == 1 and (per_layer or cfg.param_dtype != cfg.dtype)
    ptree = _decode_tree(ptree, mesh, per_layer=per_layer, fuse=fuse)
    cache = _abstract_cache(dcfg, Bw, cache_len, mesh, per_layer)
    if replicated:
        ptree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=decode_weight_sharding(
            a.sharding, mesh)), ptree)
    # the policy's own weights stay resident beside the engine's copy (a cast or re-laid-out one)
    b_master = b_params if (cfg.param_dtype != cfg.dtype or replicated or per_layer) else 0
    out["rollout"] = dict(schedule=spec.schedule, chunk_steps=C if chunked else L, cache_slots=cache_len,
                          kv_cache=b_kv, waves=waves, rows_per_wave=Bw,
                          decode_weights="replicated over the batch axes" if replicated else
                          "as trained (FSDP)" if sharded else "as trained (not split over the batch axes)",
                          decode_layout=("per_layer" if per_layer else "scan") + (", fused projections" if fuse
                                                                                   else ""),
                          decode_weights_bytes=per_device_bytes(ptree))
    n_prefill = Bw // spec.group_size if chunked and Bw % (spec.group_size * n_dp) == 0 else Bw
    tokens = _batch((n_prefill, Pn), i32, mesh)
    pmask = _batch((n_prefill, Pn), bool, mesh)
    if "prefill" in spec.phases:
        t0 = time.time()
        prefill_c = prefill.lower(dcfg, ptree, tokens, pmask, cache_len=-(-(Pn + C) // granule) * granule
                                  if chunked else cache_len, mesh=mesh).compile()
        record("prefill", prefill_c, dict(params=b_master, ref_params=b_ref, opt_state=b_opt), time.time() - t0)
    if "decode" in spec.phases and chunked and n_prefill != Bw:
        # each prompt's prefill copied to its rows: the prompts' cache in, the whole batch's out
        t0 = time.time()
        S0 = -(-(Pn + C) // granule) * granule
        pcache = _abstract_cache(dcfg, n_prefill, S0, mesh, per_layer)
        rg = _reshape_batch.lower(pcache, _batch((n_prefill, cfg.vocab_size), f32, mesh), None, new_len=cache_len,
                                  mesh=mesh, repeat=Bw // n_prefill).compile()
        record("regroup", rg, dict(params=b_master, ref_params=b_ref, opt_state=b_opt), time.time() - t0)
    if "decode" in spec.phases:
        t0 = time.time()
        logits0 = _batch((Bw, cfg.vocab_size), f32, mesh)
        modes = _batch((Bw,), i32, mesh)
        keys = _batch((Bw,), jax.random.key(0).dtype, mesh)
        kw = dict(cfg=samp, end_ids=(1, 2), stop_ids=(0,), pad_id=0, embed_impl=spec.embed_impl, mesh=mesh)
        resident = dict(params=b_master, ref_params=b_ref, opt_state=b_opt, prompt_batch=per_device_bytes(
            (tokens, pmask)))
        if chunked:  # the last chunk with every row still live: the schedule's largest program
            state = {k: _batch(v.shape, v.dtype, mesh) for k, v in jax.eval_shape(
                lambda m: init_state(m, 2), modes).items()}
            dec = decode.lower(dcfg, ptree, logits0, cache, modes, keys, modes, state, _sds((), i32, mesh),
                               steps=C, total_steps=L, **kw).compile()
            resident["rollout_buffers"] = b_roll
        else:
            dec = decode.lower(dcfg, ptree, logits0, cache, modes, keys, steps=L, **kw).compile()
        record("decode", dec, resident, time.time() - t0)
    if "logprobs" in spec.phases:
        t0 = time.time()
        lp = make_logprob_fn(graphdef, loss_cfg, mesh).lower(params, all_mb).compile()
        record("logprobs", lp, dict(other_params=b_ref, opt_state=b_opt, rollout=b_roll,
                                    old_logprobs=b_all_lp if spec.use_kl_loss else 0), time.time() - t0)
    if "update" in spec.phases:
        t0 = time.time()
        mbatch = batch_abs(n_micro)
        lp_mb = _batch((n_micro, mb, T), f32, mesh, 1)
        fn = make_update_fn(graphdef, tx, UpdateSettings(loss_cfg, n_micro), mesh)
        up = fn.lower(params, opt, mbatch, lp_mb, lp_mb).compile()
        record("update", up, dict(ref_params=b_ref, rollout=b_roll, step_batch=b_all_mb,
                                  step_logprobs=2 * b_all_lp), time.time() - t0)
    peak = max((p["peak"] for p in out["phases"].values()), default=0)
    out["peak"] = peak
    out["fits"] = bool(peak <= out["device_memory"])
    del optax
    return out


def format_plan(res: dict) -> str:
    """A human-readable table of :func:`plan`'s result."""
    unit, div = ("GiB", GiB) if res["peak"] >= GiB / 4 else ("MiB", 1024 ** 2)
    gb = lambda b: f"{b / div:8.2f}"  # noqa: E731
    m, s = res["model"], res["sizes"]
    lines = [
        f"model: {m['family']} {m['params'] / 1e9:.2f}B params, {m['layers']} layers, D={m['hidden']}, "
        f"V={m['vocab']}; weights {m['param_dtype']}, compute {m['compute_dtype']}, remat={m['remat']}",
        f"mesh: {res['mesh']} on {res['devices']} ({res['platform']})",
        f"step: rollout {s['rollout_rows']} rows x (prompt {s['prompt_bucket']} + {s['max_new_tokens']} new), K="
        f"{s['K']}; train seq {s['train_seq_len']}, micro-batch {s['micro_batch_rows']} rows, "
        f"{s['micro_batches_per_update']} per update, {s['micro_batches_per_step']} per step, logprob chunk "
        f"{s['logprob_chunk_size']}",
        f"resident per device ({unit}): " + ", ".join(f"{k} {v / div:.2f}" for k, v in res["resident"].items()),
    ]
    ro = res.get("rollout")
    if ro:
        waves = ro.get("waves", 1)
        lines.append(f"rollout: {ro['schedule']} schedule ({ro['chunk_steps']} steps per program), "
                     + (f"{waves} waves of up to {ro['rows_per_wave']} rows, " if waves > 1 else "") + "KV cache "
                     f"{ro['cache_slots']} slots per row = {ro['kv_cache'] / div:.2f} {unit} per device; decode "
                     f"weights {ro['decode_weights']}, {ro['decode_weights_bytes'] / div:.2f} {unit} per device "
                     f"({ro.get('decode_layout', 'scan')})")
    lines += [
        "",
        f"per device, {unit}:",
        "phase          args      outs     alias      temp   program  +resident     peak   compile",
    ]
    for name, p in res["phases"].items():
        lines.append(f"{name:9s} {gb(p['arguments'])}  {gb(p['outputs'])}  {gb(p['aliased'])}   "
                     f"{gb(p['temporaries'])} {gb(p['program'])}  {gb(sum(p['resident_besides'].values()))}  "
                     f"{gb(p['peak'])}   {p['compile_s']:5.1f} s")
    hbm = res["device_memory"]
    pct = 100 * res["peak"] / hbm if hbm else float("nan")
    verdict = "fits" if res["fits"] else "DOES NOT FIT"
    lines += ["", f"peak per device {res['peak'] / GiB:.2f} GiB of {hbm / GiB:.1f} GiB ({pct:.0f}%): {verdict}"]
    if res["platform"] == "cpu":
        lines.append("(compiled for simulated CPU devices: GSPMD partitioning as on the accelerator; the CPU "
                     "compiler's buffer assignment stands in for the accelerator's, so treat it as an estimate)")
        up = {n: p["cpu_upcasts"] for n, p in res["phases"].items() if p.get("cpu_upcasts")}
        if up:
            lines.append("(left out of temp: XLA:CPU's float32 copies of bf16 arguments for its dots, which GPU and "
                         "TPU read in bf16: " + ", ".join(f"{n} {b / GiB:.2f} GiB" for n, b in up.items()) + ")")
    return "\n".join(lines)


__all__ = ["PRESETS", "DEVICES", "PlanSpec", "PlanError", "model_config", "spec_from_config", "plan", "format_plan",
           "device_platform",
           "abstract_params", "abstract_opt_state", "per_device_bytes", "AXES"]


# ------------------------------------------------------------------------------------------------------ matrix
# (label, mesh, device) rows of the README table: 8-GPU nodes and TPU slices (v5p-N counts TensorCores, two per
# chip, one JAX device per chip; v5e-N counts chips).
MATRIX = (
    ("8 x H100 80GB", (1, 8, 1), "h100"),
    ("8 x H100 80GB", (1, 4, 2), "h100"),
    ("8 x H200 141GB", (1, 8, 1), "h200"),
    ("v5p-16 (8 chips)", (1, 8, 1), "v5p"),
    ("v5p-32 (16 chips)", (1, 16, 1), "v5p"),
    ("v5p-32 (16 chips)", (2, 8, 1), "v5p"),
    ("v5e-64 (64 chips)", (1, 64, 1), "v5e"),
    ("v5e-64 (64 chips)", (4, 16, 1), "v5e"),
    ("v5e-64 (64 chips)", (1, 16, 4), "v5e"),
)
MATRIX_CONFIGS = ("configs/deepscaler_1p5b.py", "configs/deepscaler_llama3b.py", "configs/deepscaler_7b.py")


def matrix(configs=MATRIX_CONFIGS, rows=MATRIX, overrides=(), log=print) -> list[dict]:
    """Plan every (config, mesh) pair on simulated CPU devices (needs ``max mesh size`` of them)."""
    from softgrpo_jax.config import get_config

    out = []
    devs = jax.devices()
    for path in configs:
        cfg = get_config(path, overrides)
        for label, mesh_shape, dev in rows:
            n = math.prod(mesh_shape)
            if n > len(devs):
                log(f"skip {label} {mesh_shape}: needs {n} devices, have {len(devs)}")
                continue
            spec = spec_from_config(cfg, mesh_shape=mesh_shape, device_memory_gb=DEVICES[dev],
                                    platform=device_platform(dev))
            t0 = time.time()
            try:
                res = plan(spec, devices=devs[:n])
            except PlanError as e:
                res = dict(error=str(e))
            res.update(config=path, label=label, mesh_shape=list(mesh_shape), device=dev,
                       wall_s=round(time.time() - t0, 1))
            out.append(res)
            if "error" in res:
                log(f"{path} {label} {mesh_shape}: {res['error']}")
            else:
                ph = " ".join(f"{k} {v['peak'] / GiB:.1f}" for k, v in res["phases"].items())
                log(f"{path} {label} {mesh_shape}: peak {res['peak'] / GiB:.1f} / {DEVICES[dev]} GiB "
                    f"({'fits' if res['fits'] else 'NO'}); {ph}")
    return out


def matrix_markdown(results: list[dict]) -> str:
    lines = ["| run | devices | mesh (data, fsdp, tensor) | prefill | decode | log-probs | update | peak / HBM | "
             "fits |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = os.path.basename(r["config"]).removesuffix(".py")
        if "error" in r:
            lines.append(f"| {name} | {r['label']} | {tuple(r['mesh_shape'])} | | | | | | {r['error']} |")
            continue
        ph = [f"{r['phases'][p]['peak'] / GiB:.1f}" if p in r["phases"] else "" for p in
              ("prefill", "decode", "logprobs", "update")]
        lines.append(f"| {name} | {r['label']} | {tuple(r['mesh_shape'])} | " + " | ".join(ph) +
                     f" | {r['peak'] / GiB:.1f} / {r['device_memory'] / GiB:.0f} | "
                     f"{'yes' if r['fits'] else '**no**'} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m softgrpo_jax.plan --matrix [--out table.md] [--config.x=y ...]
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="plan the seed's runs on common meshes (simulated CPU devices)")
    ap.add_argument("--matrix", action="store_true", required=True)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the markdown table (and .json beside it)")
    args, overrides = ap.parse_known_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    jax.config.update("jax_platforms", "cpu")
    res = matrix(overrides=overrides, log=lambda m: print(m, file=sys.stderr, flush=True))
    md = matrix_markdown(res)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(res, f, indent=1)
