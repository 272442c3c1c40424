"""The rollout engine: jitted prefill + one jitted ``lax.while_loop`` decode with a donated KV cache.

No host round trip per token. Prompts are left-padded into length buckets (1, 1.5, 2, 3, 4, ... x ``min_bucket``) so
a run compiles a handful of times. The engine decodes with its own copy of the weights in its ``dtype`` (e.g. bf16
rollouts of a float32 policy) and ``layout`` (per-layer unrolled weights on CPU and GPU, the layer scan elsewhere); the
prefill attends over the prompt's own slots and computes logits for the last position only. Data parallel: the
batch is split over the mesh's data axes (``data``, ``fsdp``) with ``NamedSharding``; parameters keep whatever
sharding they have (replicated or FSDP). Noise is keyed per row by its global index, so the same seed gives the same
rollouts whatever the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import BATCH_AXES, activation_sharding, fit_spec, host_to_global, to_host
from softgrpo_jax.models.config import ModelConfig
from softgrpo_jax.models.transformer import forward, init_cache, unstack_layers
from softgrpo_jax.ops import soft_embed
from softgrpo_jax.sampling.step import DISCRETE, GUMBEL, MODES, SamplingConfig, step
from softgrpo_jax.xla_options import jit as xla_jit

FINISH_LENGTH, FINISH_STOP, FINISH_COLD_STOP = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop", FINISH_COLD_STOP: "cold_stop"}


@flax.struct.dataclass
class Rollout:
    """What one generation call produced (B rows, P prompt slots, L = max_new_tokens, K slots).

    Response step j of row b: ``tokens[b, j]`` was emitted; ``topk_ids[b, j]`` / ``topk_ytil[b, j]`` are the K ids and
    perturbed log-probs stored for it (docs/algorithm.md, "Stored quantities"; one-hot ``[tok, 0, ...]`` and ytil 0 for discrete steps);
    ``weights[b, j]`` the input mixture of the next step; ``soft_mask`` marks soft steps. ``topk_kept[b, j]`` marks
    the slots whose token the filters kept (p_hat > 0; the others hold the next-ranked tokens at probability 0) and
    ``topk_clamped[b, j]`` the slots whose Gumbel noise lies on or beyond the log-density's clip: the trainer
    renormalises over kept slots only and passes no gradient through clamped ones (docs/algorithm.md, deviations).
    Both are None in a Rollout built without them (the trainer then uses every slot, and the clip as it falls).
    """

    prompt_tokens: jax.Array  # [B, P] int32, left-padded with pad_id
    prompt_mask: jax.Array  # [B, P] bool
    tokens: jax.Array  # [B, L] int32, right-padded with pad_id
    response_mask: jax.Array  # [B, L] bool: up to and including the stop token
    topk_ids: jax.Array  # [B, L, K] int32
    topk_ytil: jax.Array  # [B, L, K] float32
    weights: jax.Array  # [B, L, K] float32
    soft_mask: jax.Array  # [B, L] bool
    logprobs: jax.Array  # [B, L] float32 rollout log-probs (logging only)
    lengths: jax.Array  # [B] int32 response lengths
    think_lengths: jax.Array  # [B] int32 steps up to and including the end of thinking (0 for discrete rows)
    finish_reason: jax.Array  # [B] int32: 0 length, 1 stop token, 2 cold stop abort
    modes: jax.Array  # [B] int32 row modes
    tau: jax.Array  # [B] float32: the tau that rebuilds each row's soft inputs from topk_ytil
    topk_kept: jax.Array | None = None  # [B, L, K] bool: the filters kept the slot's token (slot 0 at discrete steps)
    topk_clamped: jax.Array | None = None  # [B, L, K] bool: the slot's noise is on or beyond the clip [-1.5, 3]
    stats: "RolloutStats | None" = flax.struct.field(pytree_node=False, default=None)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class RolloutStats:
    """Work counters of one ``generate`` call, summed over its decode steps: row-steps computed (every row of the
    batch, each step the loop ran) against useful (the rows' response tokens), and KV-cache slots read by decode
    attention against the slots that held the row's own context."""

    steps: int
    row_steps_computed: int
    row_steps_useful: int
    kv_slots_read: int
    kv_slots_valid: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def resolve_layout(layout: str, platform: str) -> bool:
    """``layout`` -> whether the engine runs per-layer (unrolled) weights. ``auto``: per-layer on CPU, where XLA
    keeps small-batch dots on its fast GEMM path only for whole arrays, and on GPU, where the layer scan's loop
    costs more than the step's arithmetic at decode sizes (H200, Qwen2.5-1.5B shape: 2.6 vs 4.1 ms per step at
    batch 1, 2.3 vs 4.4 at batch 64; benchmarks/RESULTS.md); a layer scan elsewhere (TPU: unmeasured; compile time
    flat in depth)."""
    if layout not in ("auto", "scan", "per_layer"):
        raise ValueError(f"layout must be auto, scan or per_layer, got {layout!r}")
    return platform in ("cpu", "gpu") if layout == "auto" else layout == "per_layer"


@functools.partial(jax.jit, static_argnames=("dtype", "per_layer"))
def _prepare(params, *, dtype, per_layer: bool):
    """The weights the engine decodes with: cast to the rollout dtype, the layer stack split when per-layer."""
    if per_layer:
        return unstack_layers(params, dtype)
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _batch_spec(mesh, shape):
    return NamedSharding(mesh, fit_spec(shape, P(BATCH_AXES, *([None] * (len(shape) - 1))), mesh))


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


@xla_jit(static_argnames=("mcfg", "cfg", "end_ids", "stop_ids", "pad_id", "steps", "embed_impl", "mesh",
                          "attention"), donate_argnames=("cache",))
def decode(mcfg: ModelConfig, params, logits0, cache, modes, row_keys, budgets=None, *, cfg: SamplingConfig,
           end_ids: tuple, stop_ids: tuple, pad_id: int, steps: int, embed_impl: str, mesh=None,
           attention: str = "xla"):
    """The decode loop: up to ``steps`` soft / discrete steps from the prefill's last logits and cache (donated);
    ``budgets`` [B] int32 caps each row's steps (None: ``steps`` for every row); ``attention`` is the decode
    attention ("xla" | "pallas", see ``models.transformer.forward``). Returns (buffers, state, cache, steps run)."""
    table = params["embed"]
    B = logits0.shape[0]
    K = cfg.max_topk
    n_end = len(end_ids)
    end_arr = jnp.asarray(end_ids if end_ids else (-1,), jnp.int32)
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    cold = cfg.early_stopping_entropy_threshold > 0

    buf = dict(
        tokens=jnp.full((B, steps), pad_id, jnp.int32),
        mask=jnp.zeros((B, steps), bool),
        ids=jnp.zeros((B, steps, K), jnp.int32),
        ytil=jnp.zeros((B, steps, K), jnp.float32),
        weights=jnp.zeros((B, steps, K), jnp.float32),
        kept=jnp.zeros((B, steps, K), bool),
        clamped=jnp.zeros((B, steps, K), bool),
        soft=jnp.zeros((B, steps), bool),
        logprob=jnp.zeros((B, steps), jnp.float32),
    )
    st = dict(
        thinking=modes != DISCRETE,
        done=jnp.zeros((B,), bool),
        finish=jnp.zeros((B,), jnp.int32),
        think_len=jnp.zeros((B,), jnp.int32),
        hist=jnp.full((B, max(n_end, 1)), -1, jnp.int32),
        low_ent=jnp.zeros((B,), jnp.int32),
        force=jnp.full((B,), -1, jnp.int32),
    )

    def cond(carry):
        i, _, _, st, _ = carry
        return (i < steps) & ~jnp.all(st["done"])

    def body(carry):
        i, logits, cache, st, buf = carry
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
        out = step(cfg, logits, keys, modes, st["thinking"])
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
        upd = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, axis=1)  # noqa: E731
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
        i, _, cache, st, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), logits0, cache, st, buf))
    return buf, st, cache, i  # returning the cache lets XLA alias it to the donated input (decode in place)


class RolloutEngine:
    """Generates rollouts for a model. ``generate`` takes token-id prompts and returns a :class:`Rollout`."""

    def __init__(self, model: nnx.Module, cfg: SamplingConfig, *, think_end_ids: Sequence[int] = (),
                 stop_ids: Sequence[int] = (), pad_id: int = 0, mesh=None, min_bucket: int = 16,
                 embed_impl: str = "auto", dtype: str | None = None, layout: str = "auto", attention: str = "auto"):
        """``dtype``: the weights' and activations' dtype while decoding (None: the model's compute dtype; e.g.
        "bfloat16" for bf16 rollouts of a float32 policy). ``layout``: "scan" (the layer stack under lax.scan),
        "per_layer" (per-layer weights, unrolled) or "auto" (per-layer on CPU and GPU, scan elsewhere).
        ``attention``: how a decode step attends over the KV cache: "xla" (every slot of the cache), "pallas"
        (each row's own context only: JAX's Pallas GPU decode-attention kernel; interpret mode off GPU, for tests)
        or "auto" (pallas on GPU, xla elsewhere)."""
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
        if attention not in ("auto", "xla", "pallas"):
            raise ValueError(f"rollout attention must be auto, xla or pallas, got {attention!r}")
        self.attention = ("pallas" if platform == "gpu" else "xla") if attention == "auto" else attention
        self._prepared = None
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

    def decode_params(self, model: nnx.Module) -> tuple[ModelConfig, dict]:
        """(config, weights) the engine decodes ``model`` with: cast to the engine's dtype, per-layer or stacked."""
        dtype = jnp.dtype(self.dtype or model.config.dtype)
        mcfg = model.config.replace(dtype=dtype.name, param_dtype=dtype.name)
        params = model.param_tree()
        leaves = jax.tree.leaves(params)
        if self.per_layer or any(a.dtype != dtype for a in leaves):
            cached = self._prepared
            if cached is not None and cached[0] == dtype and len(cached[1]) == len(leaves) and all(
                    a is b for a, b in zip(cached[1], leaves)):
                return mcfg, cached[2]  # the same weights as last call (e.g. evaluation batches)
            params = _prepare(params, dtype=dtype, per_layer=self.per_layer)
            # keep the prepared copy for the next call only where it is cheap to hold (CPU's per-layer layout)
            self._prepared = (dtype, leaves, params) if self.per_layer else None
        return mcfg, params

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
        """
        model = model or self.model
        mcfg, params = self.decode_params(model)
        cfg = self.cfg
        toks, mask = self.prepare_prompts(prompts, n)
        B = toks.shape[0]
        budgets = np.asarray(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens, np.int64)
        if budgets.ndim == 0:
            budgets = np.full(B, budgets)
        if budgets.shape != (B,) or (budgets < 1).any():
            raise ValueError(f"max_new_tokens: one budget >= 1, or one per row ({B} rows), got {max_new_tokens!r}")
        steps = int(budgets.max())
        cache_len = toks.shape[1] + steps
        if self.attention == "pallas":  # the kernel splits the cache into 16 parts of whole blocks
            cache_len = -(-cache_len // 256) * 256
        if modes is None:
            modes = [MODES[cfg.mode]] * B
        elif isinstance(modes, str):
            modes = [MODES[modes]] * B
        modes_np = np.asarray([MODES[m] if isinstance(m, str) else int(m) for m in modes], np.int32)
        if modes_np.shape != (B,):
            raise ValueError(f"need one mode per row ({B} rows), got {modes_np.shape}")
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
        logits0, cache = prefill(mcfg, params, toks_d, mask_d, cache_len=cache_len, mesh=self.mesh)
        buf, st, _, ran = decode(mcfg, params, logits0, cache, modes_d, keys_d, budgets_d, cfg=cfg,
                                 end_ids=self.think_end_ids, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                 steps=steps, embed_impl=self.embed_impl, mesh=self.mesh, attention=self.attention)
        taus = np.where(modes_np == GUMBEL, cfg.tau, 1.0).astype(np.float32)
        lengths = jnp.sum(buf["mask"], axis=1).astype(jnp.int32)
        return Rollout(
            prompt_tokens=toks_d, prompt_mask=mask_d, tokens=buf["tokens"], response_mask=buf["mask"],
            topk_ids=buf["ids"], topk_ytil=buf["ytil"], weights=buf["weights"], soft_mask=buf["soft"],
            logprobs=buf["logprob"], lengths=lengths,
            think_lengths=st["think_len"], finish_reason=st["finish"], modes=modes_d, tau=jnp.asarray(taus),
            topk_kept=buf["kept"], topk_clamped=buf["clamped"],
            stats=self._stats(int(ran), mask.sum(1), np.asarray(to_host(lengths)), cache_len))

    def _stats(self, ran: int, plen: np.ndarray, lengths: np.ndarray, cache_len: int) -> RolloutStats:
        """The decode's work: every row computed at each of the ``ran`` steps; a step of row b attends over its
        prompt's ``plen[b]`` tokens and the steps so far (its valid slots) and reads every cache slot ("xla") or
        the run from its first prompt token to the newest slot ("pallas", for every row the loop computes)."""
        plen, lengths = plen.astype(np.int64), lengths.astype(np.int64)
        B = len(plen)
        valid = int((lengths * plen + lengths * (lengths + 1) // 2).sum())
        if self.attention == "pallas":
            read = int(ran * plen.sum() + B * ran * (ran + 1) // 2)
        else:
            read = int(ran * B * cache_len)
        return RolloutStats(steps=ran, row_steps_computed=ran * B, row_steps_useful=int(lengths.sum()),
                            kv_slots_read=read, kv_slots_valid=valid)
