"""The rollout engine: jitted prefill + one jitted ``lax.while_loop`` decode with a donated KV cache.

No host round trip per token. Prompts are left-padded into length buckets (1, 1.5, 2, 3, 4, ... x ``min_bucket``) so
a run compiles a handful of times. The engine decodes with its own copy of the weights in its ``dtype`` (e.g. bf16
rollouts of a float32 policy) and ``layout`` (per-layer unrolled weights on CPU and GPU, the layer scan elsewhere:
``sampling/layout.py``); the prefill attends over the prompt's own slots and computes logits for the last position
only. Data parallel: the batch is split over the mesh's data axes (``data``, ``fsdp``) with ``NamedSharding``;
parameters keep whatever sharding they have (replicated or FSDP). Noise is keyed per row by its global index, so the
same seed gives the same rollouts whatever the device count. What a call returns: ``sampling/rollout.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import BATCH_AXES, activation_sharding, fit_spec, host_to_global, to_host
from softgrpo_jax.models.config import ModelConfig
from softgrpo_jax.models.transformer import forward, init_cache
from softgrpo_jax.ops import soft_embed
from softgrpo_jax.sampling.layout import (_batch_axes, _prepare, decode_layout, decode_per_layer, device_memory,
                                          replicate_decode_weights, resolve_layout, rollout_waves,
                                          sharded_over_batch, wave_prompts, weight_bytes)
from softgrpo_jax.sampling.rollout import (Rollout, RolloutStats, _batch_spec, _empty_buffers, _full_buffers,
                                           _valid_slots, concat_rollouts)
from softgrpo_jax.sampling.step import DISCRETE, GUMBEL, MODES, SamplingConfig, step
from softgrpo_jax.xla_options import jit as xla_jit


def bucket_length(n: int, minimum: int = 16, fine: bool = True) -> int:
    """The bucket for a length ``n``: ``minimum`` times 1, 1.5, 2, 3, 4, 6, 8, ... (``fine``: padding stays under a
    third of the bucket, and a run still compiles only a handful of shapes) or times powers of two."""
    b = minimum
    while b < n:
        half = b + b // 2
        if fine and half >= n and half % 8 == 0:
            return half
        b *= 2
    return b


def _constrain_cache(cache, mesh):
    if mesh is None:
        return cache
    out = {}
    for k, v in cache.items():
        if k in ("k", "v"):
            if isinstance(v, list):  # per-layer [B, Hkv, S, hd]
                out[k] = [jax.lax.with_sharding_constraint(a, NamedSharding(mesh, fit_spec(
                    a.shape, P(BATCH_AXES, "tensor", None, None), mesh))) for a in v]
                continue
            spec = fit_spec(v.shape, P(None, BATCH_AXES, "tensor", None, None), mesh)
        elif v.ndim:
            spec = fit_spec(v.shape, P(BATCH_AXES, *([None] * (v.ndim - 1))), mesh)
        else:
            spec = P()
        out[k] = jax.lax.with_sharding_constraint(v, NamedSharding(mesh, spec))
    return out


@xla_jit(static_argnames=("mcfg", "cache_len", "mesh"))
def prefill(mcfg: ModelConfig, params, tokens, mask, *, cache_len, mesh=None):
    """The prompt's pass: logits of the last position [B, V] and a cache of ``cache_len`` slots holding it."""
    per_layer = isinstance(params["layers"], list)
    cache = _constrain_cache(init_cache(mcfg, tokens.shape[0], cache_len, per_layer=per_layer), mesh)
    with activation_sharding(mesh):
        logits, cache = forward(mcfg, params, tokens, attention_mask=mask, cache=cache, last_only=True,
                                fresh_cache=True)
    return logits, _constrain_cache(cache, mesh)


def init_state(modes, n_end: int) -> dict:
    """The decode loop's per-row state before the first step (``decode`` carries it from chunk to chunk)."""
    B = modes.shape[0]
    return dict(
        thinking=modes != DISCRETE,
        done=jnp.zeros((B,), bool),
        finish=jnp.zeros((B,), jnp.int32),
        think_len=jnp.zeros((B,), jnp.int32),
        hist=jnp.full((B, max(n_end, 1)), -1, jnp.int32),
        low_ent=jnp.zeros((B,), jnp.int32),
        force=jnp.full((B,), -1, jnp.int32),
    )


@xla_jit(static_argnames=("mcfg", "cfg", "end_ids", "stop_ids", "pad_id", "steps", "embed_impl", "mesh",
                          "attention", "total_steps"), donate_argnames=("cache",))
def decode(mcfg: ModelConfig, params, logits0, cache, modes, row_keys, budgets=None, state=None, start=0, *,
           cfg: SamplingConfig, end_ids: tuple, stop_ids: tuple, pad_id: int, steps: int, embed_impl: str,
           mesh=None, attention: str = "xla", total_steps: int | None = None):
    """The decode loop: up to ``steps`` soft / discrete steps from the last logits and the cache (donated);
    ``budgets`` [B] int32 caps each row's steps (None: every row may run ``total_steps``, default ``steps``);
    ``attention`` is the decode attention ("xla" | "pallas_gpu" | "pallas_tpu", see ``models.transformer.forward``).

    A chunk of a longer decode starts at step ``start`` (the rows' common step index, which keys the noise) with
    the ``state`` the previous chunk returned (None: the first step's, :func:`init_state`); its buffers hold the
    chunk's ``steps`` columns. Returns (buffers, state, cache, the step index the loop stopped at); the state's
    ``logits`` are the next step's, for the chunk after."""
    table = params["embed"]
    B = logits0.shape[0]
    K = cfg.max_topk
    n_end = len(end_ids)
    end_arr = jnp.asarray(end_ids if end_ids else (-1,), jnp.int32)
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    cold = cfg.early_stopping_entropy_threshold > 0
    total = steps if total_steps is None else total_steps
    start = jnp.asarray(start, jnp.int32)

    buf = _empty_buffers(B, steps, K, pad_id)
    st = init_state(modes, n_end) if state is None else {k: v for k, v in state.items() if k != "logits"}
    end = jnp.minimum(start + steps, total)

    def cond(carry):
        i, _, _, st, _ = carry
        return (i < end) & ~jnp.all(st["done"])

    sample = functools.partial(step, cfg)
    axes = _batch_axes(mesh)
    if axes and B % math.prod(mesh.shape[a] for a in axes) == 0:
        # sampling is row-local: each device samples its own rows (no all-gather of the [B, V] logits per step)
        sample = jax.shard_map(sample, mesh=mesh, in_specs=P(axes), out_specs=P(axes), check_vma=False)

    def body(carry):
        i, logits, cache, st, buf = carry
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
        out = sample(logits, keys, modes, st["thinking"])
        token, ids, weights, ytil, soft, logprob = (out[k] for k in ("token", "ids", "weights", "ytil", "soft",
                                                                        "logprob"))
        kept, clamped = out["kept"], out["clamped"]
        thinking = st["thinking"]
        onehot_w = jnp.broadcast_to((jnp.arange(K) == 0).astype(jnp.float32), weights.shape)

        # forced think-end tokens (cold stop with a multi-token think-end string)
        forced = st["force"] >= 0
        f_tok = end_arr[jnp.clip(st["force"], 0, max(n_end - 1, 0))]
        # cold stop: consecutive low-entropy soft steps -> emit the think-end string (thinking) or abort (discrete)
        low_ent = jnp.where(out["entropy"] < cfg.early_stopping_entropy_threshold, st["low_ent"] + 1, 0) \
            if cold else st["low_ent"]
        trigger = cold & (low_ent >= cfg.early_stopping_length_threshold)
        cold_think = trigger & soft & ~forced & (n_end > 0)
        cold_abort = trigger & ~thinking & (modes != DISCRETE) & ~forced
        f_tok = jnp.where(cold_think, end_arr[0], f_tok)
        force_now = forced | cold_think
        token = jnp.where(force_now, f_tok, token)

        # think-end detection on the emitted token
        hist = jnp.concatenate([st["hist"][:, 1:], token[:, None]], axis=1)
        if n_end == 0:
            matched = jnp.zeros((B,), bool)
        elif cfg.think_end_match == "full":
            matched = jnp.all(hist == end_arr[None, :], axis=1)
        else:
            matched = token == end_arr[-1]
        matched = matched & thinking
        f_next = jnp.where(force_now, jnp.where(cold_think, 1, st["force"] + 1), -1)
        ends = matched | (force_now & (f_next >= n_end))
        f_next = jnp.where(ends, -1, f_next)
        to_onehot = ends | force_now
        ids = jnp.where(to_onehot[:, None], jnp.zeros_like(ids).at[:, 0].set(token), ids)
        weights = jnp.where(to_onehot[:, None], onehot_w, weights)
        ytil = jnp.where(to_onehot[:, None], 0.0, ytil)
        kept = jnp.where(to_onehot[:, None], onehot_w > 0, kept)
        clamped = clamped & ~to_onehot[:, None]
        soft = soft & ~to_onehot
        # log softmax(logits / T)[token] from the step's logsumexp (the step's T: thinking rows are soft rows)
        tok_lp = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] / out["temperature"] - out["lse"]
        logprob = jnp.where(to_onehot, tok_lp, logprob)

        active = ~st["done"]
        stop = jnp.any(token[:, None] == stop_arr[None, :], axis=1)
        out_of_budget = (i + 1 >= budgets) if budgets is not None else jnp.zeros((B,), bool)
        done = st["done"] | (active & (stop | cold_abort | out_of_budget))
        finish = jnp.where(active & stop, 1, jnp.where(active & cold_abort, 2, st["finish"]))
        think_len = jnp.where(active & thinking, i + 1, st["think_len"])
        new_st = dict(thinking=thinking & ~ends, done=done, finish=finish, think_len=think_len, hist=hist,
                      low_ent=jnp.where(ends, 0, low_ent), force=f_next)

        tok_w = jnp.where(active, token, pad_id)
        upd = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i - start, axis=1)  # noqa: E731
        buf = dict(
            tokens=upd(buf["tokens"], tok_w),
            mask=upd(buf["mask"], active),
            ids=upd(buf["ids"], jnp.where(active[:, None], ids, 0)),
            ytil=upd(buf["ytil"], jnp.where(active[:, None], ytil, 0.0)),
            weights=upd(buf["weights"], jnp.where(active[:, None], weights, 0.0)),
            kept=upd(buf["kept"], active[:, None] & kept),
            clamped=upd(buf["clamped"], active[:, None] & clamped),
            soft=upd(buf["soft"], active & soft),
            logprob=upd(buf["logprob"], jnp.where(active, logprob, 0.0)),
        )
        emb = soft_embed(table, ids, weights, impl=embed_impl).astype(mcfg.jnp_dtype)
        next_logits, cache = forward(mcfg, params, inputs_embeds=emb[:, None, :],
                                     attention_mask=(active & ~done)[:, None], cache=cache, decode_attention=attention)
        return i + 1, next_logits[:, 0], cache, new_st, buf

    with activation_sharding(mesh):
        i, logits, cache, st, buf = jax.lax.while_loop(cond, body, (start, logits0, cache, st, buf))
    st["logits"] = logits
    return buf, st, cache, i  # returning the cache lets XLA alias it to the donated input (decode in place)


def cache_bucket(n: int, granule: int = 16) -> int:
    """The cache length a decode chunk that needs ``n`` slots runs with: the smallest of 1, 1.125, 1.25, ...,
    1.875 x a power of two (rounded up to ``granule``) that holds ``n``, so XLA's attention reads at most 1.125x
    the slots it needs and a rollout compiles a few cache lengths per doubling."""
    p = granule
    while True:
        for q in range(8, 16):
            m = -(-(p * q // 8) // granule) * granule
            if m >= n:
                return m
        p *= 2


def batch_bucket(n: int, minimum: int = 1) -> int:
    """The batch a chunk runs its live rows in: ``minimum`` (the mesh's batch devices) x 1, 2, 3, 4, 5, 6, 7, 8,
    10, 12, 14, 16, 20, ... (steps of a quarter of a power of two), so at most 1.25x the rows are computed."""
    b = 1
    while True:
        for m in (b, b + b // 4, b + b // 2, b + 3 * b // 4) if b >= 4 else range(b, 2 * b):
            if minimum * m >= n:
                return minimum * m
        b *= 2


def _batch_axis(path) -> int:
    """The batch axis of a leaf of ``(cache, rest)``: 1 for a stacked cache's k / v [L, B, ...], else 0 (a
    per-layer cache's k / v [B, ...], the mask, positions and every array of ``rest``)."""
    return 1 if (len(path) == 2 and getattr(path[0], "idx", None) == 0
                 and getattr(path[1], "key", None) in ("k", "v")) else 0


def _rows(tree, fn):
    """``fn(array, batch_axis)`` on every leaf of a (cache, rest) pytree, except the cache's scalar index."""
    return jax.tree_util.tree_map_with_path(lambda p, a: fn(a, _batch_axis(p)) if a.ndim else a, tree)


def _leaf_spec(mesh, a, axis: int):
    spec = [None] * a.ndim
    spec[axis] = BATCH_AXES
    if a.ndim >= 4:  # k / v: the KV heads over tensor
        spec[axis + 1] = "tensor"
    return fit_spec(a.shape, P(*spec), mesh)


def _grow(cache, new_len: int):
    """The cache with empty slots appended up to ``new_len`` (slot order, and so every position, unchanged)."""
    out = dict(cache)
    for k in ("k", "v"):
        v = cache[k]
        if isinstance(v, list):
            out[k] = [jnp.pad(a, ((0, 0), (0, 0), (0, new_len - a.shape[2]), (0, 0))) for a in v]
        else:
            out[k] = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, new_len - v.shape[3]), (0, 0)))
    out["mask"] = jnp.pad(cache["mask"], ((0, 0), (0, new_len - cache["mask"].shape[1])))
    return out


@functools.partial(jax.jit, static_argnames=("new_len", "mesh", "repeat", "local"))
def _reshape_batch(cache, rest, idx, *, new_len: int, mesh=None, repeat: int = 1, local: bool = True):
    """Between decode chunks: the rows of the cache and of every array in ``rest`` (a pytree of [B, ...] arrays)
    that the next chunk runs, and the cache grown to ``new_len`` slots. ``repeat`` > 1: every row ``repeat`` times
    in a row (a prompt's prefill for its group). ``idx``: the rows to keep; ``local``: as indices into each batch
    shard's own rows (on a mesh the rows never leave their device: no all-gather of the cache), else global ones
    (for a small input, such as the prefill of a few prompts)."""
    tree = (cache, rest)
    if repeat > 1:  # broadcast + reshape: each shard repeats its own rows
        tree = _rows(tree, lambda a, ax: jnp.repeat(a, repeat, axis=ax))
    if idx is not None:
        axes = _batch_axes(mesh)
        if axes and local:
            specs = jax.tree_util.tree_map_with_path(
                lambda p, a: _leaf_spec(mesh, a, _batch_axis(p)) if a.ndim else P(), tree)

            def take_local(t, i):
                return _rows(t, lambda a, ax: jnp.take(a, i, axis=ax))

            out_shapes = jax.eval_shape(lambda t: _rows(t, lambda a, ax: jnp.take(a, jnp.zeros(idx.shape, jnp.int32),
                                                                                     axis=ax)), tree)
            out_specs = jax.tree_util.tree_map_with_path(
                lambda p, a: _leaf_spec(mesh, a, _batch_axis(p)) if a.ndim else P(), out_shapes)
            tree = jax.shard_map(take_local, mesh=mesh, in_specs=(specs, P(axes)), out_specs=out_specs,
                                 check_vma=False)(tree, idx)
        else:
            tree = _rows(tree, lambda a, ax: jnp.take(a, idx, axis=ax))
    cache, rest = tree
    cache = _grow(cache, new_len) if new_len != cache["mask"].shape[1] else cache
    if mesh is not None:
        rest = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, _batch_spec(mesh, a.shape)), rest)
    return _constrain_cache(cache, mesh), rest


@functools.partial(jax.jit, donate_argnames=("full",))
def _write_chunk(full, chunk, rows, start):
    """Write a chunk's buffers (columns ``start`` on) into the rollout's, row ``rows[j]`` from the chunk's row j;
    rows out of range (padding) and columns past the end are dropped."""
    def put(f, c):
        cols = start + jnp.arange(c.shape[1])
        return f.at[rows[:, None], cols[None, :]].set(c, mode="drop")
    return jax.tree.map(put, full, chunk)


class RolloutEngine:
    """Generates rollouts for a model. ``generate`` takes token-id prompts and returns a :class:`Rollout`."""

    def __init__(self, model: nnx.Module, cfg: SamplingConfig, *, think_end_ids: Sequence[int] = (),
                 stop_ids: Sequence[int] = (), pad_id: int = 0, mesh=None, min_bucket: int = 16,
                 embed_impl: str = "auto", dtype: str | None = None, layout: str = "auto", attention: str = "auto",
                 schedule: str = "chunked", chunk_steps: int = 128, fuse_projections: bool = True,
                 max_rows_per_device: int = 0):
        """``dtype``: the weights' and activations' dtype while decoding (None: the model's compute dtype; e.g.
        "bfloat16" for bf16 rollouts of a float32 policy). ``layout``: "scan" (the layer stack under lax.scan),
        "per_layer" (per-layer weights, unrolled) or "auto" (per-layer on CPU and GPU, scan elsewhere and for
        weights that stay FSDP shards while decoding: :func:`decode_per_layer`).
        ``attention``: how a decode step attends over the KV cache: "xla" (every slot of the cache), "pallas"
        (each row's own context only: JAX's Pallas GPU decode-attention kernel on GPU, the project's Pallas TPU
        kernel on TPU, not yet measured there; "pallas_gpu" / "pallas_tpu" force one, interpreted off its
        platform, for tests) or "auto" (pallas on GPU, xla elsewhere). ``schedule``: "chunked" (the decode runs ``chunk_steps`` steps
        at a time over a cache just long enough for them; between chunks finished rows leave the batch and the
        n rows of a prompt share one prefill) or "static" (one loop over a cache of the whole budget, every row
        computed until the last one ends: the reference; the same tokens). ``fuse_projections``: decode with each
        layer's query / key / value weights as one GEMM and gate / up as one (4 weight GEMMs per layer instead of
        7), where the engine makes its own copy of the weights (per-layer layout or a cast to the rollout dtype)
        and the mesh has no tensor parallelism. ``max_rows_per_device``: decode at most this many rows per batch
        device at a time, the rollout's prompts split into waves run one after the other (the same rollouts); 0:
        only where the weights would otherwise decode from their FSDP shards (:func:`rollout_waves`)."""
        self.model = model
        try:
            ok = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"rollout dtype must be a floating dtype (float32, bfloat16, ...), got {dtype!r}")
        self.dtype = dtype
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        self.per_layer = resolve_layout(layout, platform)
        self._layout = (layout, platform)
        if attention not in ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu"):
            raise ValueError(f"rollout attention must be auto, xla or pallas, got {attention!r}")
        if attention == "auto":
            # TPU stays on XLA until its kernel has run there
            attention = "pallas" if platform == "gpu" else "xla"
        if attention == "pallas":  # the platform's kernel (off GPU / TPU: the GPU one, interpreted)
            attention = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
        self.attention = attention  # "xla", "pallas_gpu" or "pallas_tpu": forward's decode_attention
        if schedule not in ("chunked", "static"):
            raise ValueError(f"rollout schedule must be chunked or static, got {schedule!r}")
        if int(chunk_steps) < 1:
            raise ValueError(f"rollout chunk_steps must be >= 1, got {chunk_steps!r}")
        self.schedule = schedule
        self.chunk_steps = int(chunk_steps)
        if int(max_rows_per_device) < 0:
            raise ValueError(f"rollout max_rows_per_device must be >= 0 (0: automatic), got {max_rows_per_device!r}")
        self.max_rows_per_device = int(max_rows_per_device)
        self._prepared = None
        self.fuse = bool(fuse_projections) and (mesh is None or mesh.shape.get("tensor", 1) == 1)
        self.cfg = cfg
        self.think_end_ids = tuple(int(t) for t in think_end_ids)
        self.stop_ids = tuple(int(t) for t in stop_ids)
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.min_bucket = min_bucket
        self.embed_impl = embed_impl

    @classmethod
    def for_tokenizer(cls, model, cfg: SamplingConfig, tokenizer, *, think_end: str = "</think>", mesh=None,
                      extra_stop_ids: Sequence[int] = (), **kw) -> "RolloutEngine":
        """Take think-end ids, stop ids (EOS and the model's eos ids) and the pad id from a HF tokenizer."""
        end = tokenizer.encode(think_end, add_special_tokens=False) if think_end else []
        stops = set(model.config.eos_token_id) | set(extra_stop_ids)
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        return cls(model, cfg, think_end_ids=end, stop_ids=sorted(stops), pad_id=pad, mesh=mesh, **kw)

    def decode_params(self, model: nnx.Module, kv_bytes: int = 0) -> tuple[ModelConfig, dict]:
        """(config, weights) the engine decodes ``model`` with: cast to the engine's dtype, per-layer or stacked
        (:func:`decode_per_layer`), laid out for decoding on the mesh (:func:`decode_layout`; ``kv_bytes``: the KV
        cache per device)."""
        dtype = jnp.dtype(self.dtype or model.config.dtype)
        mcfg = model.config.replace(dtype=dtype.name, param_dtype=dtype.name)
        params = model.param_tree()
        leaves = jax.tree.leaves(params)
        replicate = replicate_decode_weights(params, self.mesh, kv_bytes=kv_bytes, dtype=dtype)
        per_layer = decode_per_layer(*self._layout, sharded_over_batch(params, self.mesh) and not replicate)
        if per_layer or any(a.dtype != dtype for a in leaves):
            cached, key = self._prepared, (dtype, per_layer, replicate)
            if cached is not None and cached[0] == key and len(cached[1]) == len(leaves) and all(
                    a is b for a, b in zip(cached[1], leaves)):
                return mcfg, cached[2]  # the same weights as last call (e.g. evaluation batches)
            params = _prepare(params, dtype=dtype, per_layer=per_layer, fuse=self.fuse)
            params = decode_layout(params, self.mesh, replicate=replicate)
            # keep the prepared copy for the next call only where it is cheap to hold (CPU's per-layer layout; on an
            # accelerator it would sit in device memory through the update, which its plan does not count)
            self._prepared = (key, leaves, params) if per_layer and self._layout[1] == "cpu" else None
            return mcfg, params
        return mcfg, decode_layout(params, self.mesh, replicate=replicate)

    def prepare_prompts(self, prompts: Sequence[Sequence[int]], n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad token-id prompts (each repeated ``n`` times, consecutively) into a length bucket."""
        if not prompts:
            raise ValueError("no prompts")
        rows = [list(p) for p in prompts for _ in range(n)]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        Pn = bucket_length(max(len(r) for r in rows), self.min_bucket)
        toks = np.full((len(rows), Pn), self.pad_id, np.int32)
        mask = np.zeros((len(rows), Pn), bool)
        for b, r in enumerate(rows):
            toks[b, Pn - len(r):] = r
            mask[b, Pn - len(r):] = True
        return toks, mask

    def generate(self, prompts: Sequence[Sequence[int]], key: jax.Array, *, n: int = 1, modes=None,
                 max_new_tokens: int | Sequence[int] | None = None, model: nnx.Module | None = None,
                 row_offset: int = 0) -> Rollout:
        """Sample ``n`` completions per prompt (rows ``[p0]*n + [p1]*n + ...``).

        ``modes``: None (the config's mode), a mode name, or one name / int per row. ``max_new_tokens``: None (the
        config's), one budget for every row, or one per row (a row stops at its own budget, finish reason
        "length"). ``row_offset`` shifts the global row index that keys the noise (for a process holding a shard
        of a larger batch). The returned Rollout's ``stats`` count the decode's work (:class:`RolloutStats`).
        Where the rows decode in waves (:meth:`waves`), the prompts go in consecutive groups of whole prompts, and
        the result is laid out as one call would lay it out (:func:`concat_rollouts`): the same rollouts.
        """
        model = model or self.model
        cfg = self.cfg
        toks, _ = self.prepare_prompts(prompts, 1)  # (validates them)
        B = toks.shape[0] * n
        budgets = np.asarray(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens, np.int64)
        if budgets.ndim == 0:
            budgets = np.full(B, budgets)
        if budgets.shape != (B,) or (budgets < 1).any():
            raise ValueError(f"max_new_tokens: one budget >= 1, or one per row ({B} rows), got {max_new_tokens!r}")
        if modes is None:
            modes = [MODES[cfg.mode]] * B
        elif isinstance(modes, str):
            modes = [MODES[modes]] * B
        modes_np = np.asarray([MODES[m] if isinstance(m, str) else int(m) for m in modes], np.int32)
        if modes_np.shape != (B,):
            raise ValueError(f"need one mode per row ({B} rows), got {modes_np.shape}")
        waves = self.waves(model, B, self._cache_len(toks.shape[1], int(budgets.max())))
        if waves == 1:
            return self._generate(prompts, key, n, modes_np, budgets, model, row_offset)
        # prompts per wave: whole groups, a multiple of the batch devices where that divides (one prefill per
        # prompt on each device)
        per = wave_prompts(len(prompts), waves, self._batch_devices())
        parts = [self._generate(prompts[i:i + per], key, n, modes_np[i * n:(i + per) * n],
                                budgets[i * n:(i + per) * n], model, row_offset + i * n)
                 for i in range(0, len(prompts), per)]
        return concat_rollouts(parts, self.pad_id, self.mesh)

    def _batch_devices(self) -> int:
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in _batch_axes(self.mesh))

    def _cache_len(self, prompt_width: int, steps: int) -> int:
        """The KV cache slots a row of a rollout holds at most (the static schedule's cache)."""
        cache_len = prompt_width + steps
        if self.attention != "xla":  # whole kernel blocks: 16 splits of 16 slots (GPU), 128-slot blocks (TPU)
            cache_len = -(-cache_len // 256) * 256
        return cache_len

    def _kv_bytes_per_row(self, model, cache_len: int) -> int:
        mc = model.config
        tp = 1 if self.mesh is None else self.mesh.shape.get("tensor", 1)
        return (cache_len * 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim
                * jnp.dtype(self.dtype or mc.dtype).itemsize // tp)

    def waves(self, model, rows: int, cache_len: int) -> int:
        """How many waves ``rows`` rows of up to ``cache_len`` cache slots decode in: ``max_rows_per_device``'s
        share where it is set, else :func:`rollout_waves` (1 on a platform that reports no memory, as XLA:CPU)."""
        per_device = -(-rows // self._batch_devices())
        if self.max_rows_per_device:
            return -(-per_device // self.max_rows_per_device)
        params = model.param_tree()
        budget, in_use = device_memory(self.mesh)
        dtype = self.dtype or model.config.dtype
        return rollout_waves(weight_bytes(params, dtype), per_device, self._kv_bytes_per_row(model, cache_len),
                             self.mesh, budget, in_use, sharded=sharded_over_batch(params, self.mesh))

    def _generate(self, prompts, key, n: int, modes_np: np.ndarray, budgets: np.ndarray, model, row_offset: int
                  ) -> Rollout:
        """:meth:`generate` for one wave: every row decoded at once."""
        cfg = self.cfg
        toks, mask = self.prepare_prompts(prompts, n)
        B = toks.shape[0]
        steps = int(budgets.max())
        cache_len = self._cache_len(toks.shape[1], steps)
        kv_bytes = -(-B // self._batch_devices()) * self._kv_bytes_per_row(model, cache_len)
        mcfg, params = self.decode_params(model, kv_bytes=kv_bytes)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B) + row_offset)
        ragged = bool((budgets != steps).any())
        args = [toks, mask, modes_np, row_keys] + ([budgets.astype(np.int32)] if ragged else [])
        if self.mesh is not None:
            # host_to_global: with several processes, each transfers only the rows its devices hold
            kd = np.asarray(jax.random.key_data(row_keys))
            args[3] = kd
            args = [host_to_global(a, _batch_spec(self.mesh, a.shape)) for a in args]
            args[3] = jax.random.wrap_key_data(args[3], impl=jax.random.key_impl(row_keys))
        toks_d, mask_d, modes_d, keys_d = args[:4]
        budgets_d = args[4] if ragged else None
        plen = mask.sum(1)
        if self.schedule == "chunked":
            buf, finish, think_len, stats = self._decode_chunked(mcfg, params, toks, mask, modes_np, row_keys, budgets,
                                                                 n, plen)
        else:
            logits0, cache = prefill(mcfg, params, toks_d, mask_d, cache_len=cache_len, mesh=self.mesh)
            buf, st, _, ran = decode(mcfg, params, logits0, cache, modes_d, keys_d, budgets_d, cfg=cfg,
                                     end_ids=self.think_end_ids, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                     steps=steps, embed_impl=self.embed_impl, mesh=self.mesh,
                                     attention=self.attention)
            finish, think_len, stats = st["finish"], st["think_len"], None
        taus = np.where(modes_np == GUMBEL, cfg.tau, 1.0).astype(np.float32)
        lengths = jnp.sum(buf["mask"], axis=1).astype(jnp.int32)
        lengths_np = np.asarray(to_host(lengths))
        if stats is None:
            stats = self._stats(int(ran), plen, lengths_np, cache_len)
        else:
            stats = dataclasses.replace(stats, row_steps_useful=int(lengths_np.sum()),
                                        kv_slots_valid=_valid_slots(plen, lengths_np))
        return Rollout(
            prompt_tokens=toks_d, prompt_mask=mask_d, tokens=buf["tokens"], response_mask=buf["mask"],
            topk_ids=buf["ids"], topk_ytil=buf["ytil"], weights=buf["weights"], soft_mask=buf["soft"],
            logprobs=buf["logprob"], lengths=lengths,
            think_lengths=think_len, finish_reason=finish, modes=modes_d, tau=jnp.asarray(taus),
            topk_kept=buf["kept"], topk_clamped=buf["clamped"], stats=stats)

    def _put(self, a):
        a = np.asarray(a)
        return host_to_global(a, None if self.mesh is None else _batch_spec(self.mesh, a.shape))

    def _decode_chunked(self, mcfg, params, toks, mask, modes_np, row_keys, budgets, n, plen):
        """The chunked schedule (see ``__init__``): prefill each prompt once, then decode ``chunk_steps`` steps at a
        time; between chunks the cache grows to the next :func:`cache_bucket` the coming chunk needs, and the live
        rows move into the smallest :func:`batch_bucket` that holds them (the padding slots repeat a live row and
        write nothing). Every row's noise is keyed by its global row and step, so its tokens are the static
        schedule's. With the Pallas decode attention, which reads only each row's own slots, the cache keeps one
        length. Returns (buffers, finish reasons, think lengths, RolloutStats without the useful counts)."""
        cfg = self.cfg
        B, Pn = toks.shape
        total = int(budgets.max())
        C = min(self.chunk_steps, total)
        d = 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in _batch_axes(self.mesh))
        granule = 256 if self.attention != "xla" else self.min_bucket
        # the Pallas kernel reads each row's own slots whatever the cache's length: one length for the whole
        # rollout (programs per batch bucket only); XLA's attention reads every slot: a cache grown chunk by chunk
        fixed = -(-(Pn + total) // granule) * granule if self.attention != "xla" else None
        length_for = (lambda n: fixed) if fixed else (lambda n: cache_bucket(n, granule))
        first_len = length_for(Pn + C)

        # one prefill per prompt (rows come as n consecutive copies of each prompt), over the first chunk's slots:
        # the copy to the group's rows writes the cache the first chunk runs with
        uniq = np.arange(0, B, n)
        logits, cache = prefill(mcfg, params, self._put(toks[uniq]), self._put(mask[uniq]),
                                cache_len=-(-(Pn + C) // granule) * granule, mesh=self.mesh)
        slot_rows = np.arange(B)
        if B % d == 0 and len(uniq) % d == 0:  # each device repeats its own prompts' prefill
            if n > 1:
                cache, logits = _reshape_batch(cache, logits, None, new_len=first_len, mesh=self.mesh, repeat=n)
        else:  # few prompts (the prefill is replicated): every device takes its rows, padded to a batch bucket
            b = batch_bucket(B, d)
            src = np.concatenate([np.arange(B) // n, np.zeros(b - B, np.int64)])
            slot_rows = np.concatenate([slot_rows, np.full(b - B, B)])
            cache, logits = _reshape_batch(cache, logits, self._put(src.astype(np.int32)), new_len=first_len,
                                           mesh=self.mesh, local=False)
        pad_src = np.minimum(slot_rows, B - 1)
        kd = np.asarray(jax.random.key_data(row_keys))
        rest = dict(modes=self._put(modes_np[pad_src]), keys=self._put(kd[pad_src]),
                    budgets=self._put(np.where(slot_rows < B, budgets[pad_src], 0).astype(np.int32)))
        impl = jax.random.key_impl(row_keys)
        K = cfg.max_topk
        full = _full_buffers(B, total, K, self.pad_id, self.mesh)
        finish = np.zeros(B, np.int32)
        think_len = np.zeros(B, np.int32)
        state = init_state(rest["modes"], len(self.think_end_ids))
        state["done"] = self._put(slot_rows >= B)  # padding slots write nothing and never hold the loop
        i = computed = read = 0
        while i < total:
            need = length_for(Pn + min(i + C, total))
            if need != cache["mask"].shape[1]:
                cache, _ = _reshape_batch(cache, None, None, new_len=need, mesh=self.mesh)
            S = cache["mask"].shape[1]
            cbuf, state, cache, stop = decode(
                mcfg, params, logits, cache, rest["modes"], jax.random.wrap_key_data(rest["keys"], impl=impl),
                rest["budgets"], state, i, cfg=cfg, end_ids=self.think_end_ids, stop_ids=self.stop_ids,
                pad_id=self.pad_id, steps=C, embed_impl=self.embed_impl, mesh=self.mesh, attention=self.attention,
                total_steps=total)
            full = _write_chunk(full, cbuf, self._put(np.where(slot_rows < B, slot_rows, B).astype(np.int32)), i)
            stop = int(stop)
            ran, bsz = stop - i, len(slot_rows)
            computed += ran * bsz
            if self.attention != "xla":  # each slot's row reads its prompt and the steps so far
                pl = plen[np.minimum(slot_rows, B - 1)].astype(np.int64)
                read += int(ran * pl.sum() + bsz * (stop * (stop + 1) - i * (i + 1)) // 2)
            else:
                read += ran * bsz * S
            i = stop
            small = {k: np.asarray(to_host(state[k])) for k in ("done", "finish", "think_len")}
            real = slot_rows < B
            finish[slot_rows[real]] = small["finish"][real]
            think_len[slot_rows[real]] = small["think_len"][real]
            live = real & ~small["done"]
            if i >= total or not live.any():
                break
            # finished rows leave the batch, each device keeping its own live rows (padded with one of them,
            # marked done) in the smallest bucket that holds the fullest device's
            per = bsz // d
            live_d = live.reshape(d, per)
            m = batch_bucket(int(live_d.sum(1).max()))
            if m < per:
                idx = np.zeros((d, m), np.int32)
                rows = np.full((d, m), B)
                for j in range(d):
                    keep = np.flatnonzero(live_d[j])
                    idx[j, :len(keep)] = keep
                    idx[j, len(keep):] = keep[0] if len(keep) else 0
                    rows[j, :len(keep)] = slot_rows[j * per + keep]
                slot_rows = rows.ravel()
                cache, (logits, state, rest) = _reshape_batch(
                    cache, (state.pop("logits"), state, rest), self._put(idx.ravel()),
                    new_len=cache["mask"].shape[1], mesh=self.mesh)
                state["done"] = state["done"] | self._put(slot_rows >= B)
            else:
                logits = state.pop("logits")
        stats = RolloutStats(steps=i, row_steps_computed=computed, row_steps_useful=0, kv_slots_read=read,
                             kv_slots_valid=0)
        return full, self._put(finish), self._put(think_len), stats

    def _stats(self, ran: int, plen: np.ndarray, lengths: np.ndarray, cache_len: int) -> RolloutStats:
        """The decode's work: every row computed at each of the ``ran`` steps; a step of row b attends over its
        prompt's ``plen[b]`` tokens and the steps so far (its valid slots) and reads every cache slot ("xla") or
        the run from its first prompt token to the newest slot ("pallas", for every row the loop computes)."""
        plen, lengths = plen.astype(np.int64), lengths.astype(np.int64)
        B = len(plen)
        valid = _valid_slots(plen, lengths)
        if self.attention != "xla":
            read = int(ran * plen.sum() + B * ran * (ran + 1) // 2)
        else:
            read = int(ran * B * cache_len)
        return RolloutStats(steps=ran, row_steps_computed=ran * B, row_steps_useful=int(lengths.sum()),
                            kv_slots_read=read, kv_slots_valid=valid)
