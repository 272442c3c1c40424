"""One Flax NNX decoder for Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen and Llama 3.x / SmolLM2: the architecture.

Layout: the per-layer weights are stacked along a leading layer axis ``[L, ...]`` so the layers run as one
``lax.scan`` (compile time flat in depth) or, with ``scan_layers=False``, unrolled. :func:`forward` is the functional
core (config + a dict of weights); :func:`unstack_layers` turns the stack into per-layer weights, which run unrolled
(the rollout engine's layout on CPU). Linear weights are stored ``[in, out]``. Shapes: B batch, T query length,
S cache slots, D width, H query heads, G = H / Hkv, hd head dim, V vocab.

The kernels a layer runs (attention variants, GEMMs with written-out backward passes, the SwiGLU MLP, the
vocabulary-chunked log-prob, remat policies) live in ``softgrpo_jax.ops``; how they are built is set by
``softgrpo_jax.ops.tuning``.

The KV cache is a plain dict (a pytree) of fixed size, so decoding compiles once:
  ``k, v``: [L, B, Hkv, S, hd]   keys / values per slot (per-layer weights: lists of L arrays [B, Hkv, S, hd])
  ``mask``: [B, S] bool          slot holds a real (non-padding) token
  ``pos``:  [B] int32            number of real tokens seen per row (the next RoPE position)
  ``index``: [] int32            next slot to write (shared by the batch: prompts are left-padded)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from softgrpo_jax.distributed import constrain_batch
from softgrpo_jax.models.config import ModelConfig
from softgrpo_jax.ops import attention, attention_block, mlp
from softgrpo_jax.ops import residuals as ckpt
from softgrpo_jax.ops import vocab_logprobs as vocab_lp
from softgrpo_jax.ops.matmul import dense, matmul
from softgrpo_jax.ops.rope import apply_rope
from softgrpo_jax.ops.tiling import update_slots

# PartitionSpecs over the named mesh axes ("data", "fsdp", "tensor"). Layer-stacked weights lead with None.
PARAM_SPECS = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm": P(None),
    "attn_norm": P(None, None),
    "mlp_norm": P(None, None),
    "wq": P(None, "fsdp", "tensor"),
    "wk": P(None, "fsdp", "tensor"),
    "wv": P(None, "fsdp", "tensor"),
    "bq": P(None, "tensor"),
    "bk": P(None, "tensor"),
    "bv": P(None, "tensor"),
    "wo": P(None, "tensor", "fsdp"),
    "bo": P(None, None),
    "w_gate": P(None, "fsdp", "tensor"),
    "w_up": P(None, "fsdp", "tensor"),
    "w_down": P(None, "tensor", "fsdp"),
}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter, keyed by the leaf name used in the NNX state."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "embed": (V, D),
        "final_norm": (D,),
        "attn_norm": (L, D),
        "mlp_norm": (L, D),
        "wq": (L, D, q),
        "wk": (L, D, kv),
        "wv": (L, D, kv),
        "wo": (L, q, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        shapes.update(bq=(L, q), bk=(L, kv), bv=(L, kv))
    if cfg.o_bias:
        shapes["bo"] = (L, D)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


DECODE_ATTENTION = ("xla", "pallas", "pallas_gpu", "pallas_tpu")
LAYER_KEYS = ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "w_gate", "w_up", "w_down")


class Layers(nnx.Module):
    """Container of the layer-stacked weights (one nnx.Param per weight kind, leading axis = layer)."""

    def __init__(self, params: dict[str, nnx.Param]):
        for k, v in params.items():
            setattr(self, k, v)

    def as_dict(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in LAYER_KEYS if hasattr(self, k)}


def _init_value(name, shape, dtype, key):
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    if name.startswith("b"):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Transformer(nnx.Module):
    """Decoder-only transformer (GQA, RMSNorm, SwiGLU, RoPE) with an ``inputs_embeds`` entry for soft tokens."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, abstract: bool = False):
        self.config = cfg
        rngs = rngs or nnx.Rngs(0)
        shapes = param_shapes(cfg)
        dt = cfg.jnp_param_dtype

        def make(name):
            if abstract:
                value = jnp.zeros(shapes[name], dt)
            else:
                value = _init_value(name, shapes[name], dt, rngs.params())
            return nnx.Param(value, pspec=PARAM_SPECS[name])

        self.embed = make("embed")
        self.final_norm = make("final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = make("lm_head")
        self.layers = Layers({k: make(k) for k in LAYER_KEYS if k in shapes})

    # ------------------------------------------------------------------------------------------------ helpers
    def embedding_table(self) -> jax.Array:
        """The input embedding table E [V, D] (what soft tokens mix)."""
        return self.embed[...]

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Final hidden states [..., D] (already normed) -> float32 logits [..., V]."""
        return logits_from_hidden(self.config, self.param_tree(), h)

    def logits_at_ids(self, h: jax.Array, ids: jax.Array) -> jax.Array:
        """The logits of given ids only: h [..., D], ids [..., K] -> float32 [..., K] (see :func:`logits_at_ids`)."""
        return logits_at_ids(self.config, self.param_tree(), h, ids)

    def vocab_logprobs(self, h: jax.Array, targets: jax.Array, need: jax.Array, *, temperature=1.0,
                       chunk_size: int | None = None) -> jax.Array:
        """``log_softmax(logits / temperature)[targets]`` where ``need`` (see :func:`vocab_logprobs`)."""
        return vocab_logprobs(self.config, self.param_tree(), h, targets, need, temperature=temperature,
                              chunk_size=chunk_size)

    def param_tree(self) -> dict[str, Any]:
        """The weights as a plain dict (what :func:`forward` takes): ``embed``, ``final_norm``, ``lm_head`` (untied
        models) and ``layers`` (the layer-stacked dict)."""
        tree = {"embed": self.embed[...], "final_norm": self.final_norm[...], "layers": self.layers.as_dict()}
        if not self.config.tie_word_embeddings:
            tree["lm_head"] = self.lm_head[...]
        return tree

    def init_cache(self, batch_size: int, max_len: int, dtype=None, per_layer: bool = False) -> dict[str, Any]:
        return init_cache(self.config, batch_size, max_len, dtype, per_layer=per_layer)

    # ------------------------------------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array | None = None, **kw):
        """Run the decoder: see :func:`forward` (this module's weights, this module's config)."""
        return forward(self.config, self.param_tree(), input_ids, **kw)


def unstack_layers(params: dict[str, Any], dtype=None) -> dict[str, Any]:
    """``params`` (a :meth:`Transformer.param_tree`) with the layer stack split into a list of per-layer dicts and
    every weight cast to ``dtype`` (None keeps it). :func:`forward` then runs the layers unrolled, each dot on a
    weight of its own: on XLA:CPU this is what keeps small-batch (decode) dots on the fast GEMM path, bf16 above all
    (a dot on a slice of a stacked weight, inside a scan or not, runs several times slower there)."""
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    out = {k: cast(v) for k, v in params.items() if k != "layers"}
    stacked = params["layers"]
    n = next(iter(stacked.values())).shape[0]
    out["layers"] = [{k: cast(v[i]) for k, v in stacked.items()} for i in range(n)]
    return out


# fused projections of the decode layout: each fused weight is its parts concatenated along the output dim
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_projections(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (stacked or :func:`unstack_layers`) with each layer's query / key / value projections as one
    weight ``wqkv`` (``bqkv`` the biases) and the gate / up projections as one ``w_gate_up``: a decode step then
    runs 4 weight GEMMs per layer instead of 7, each reading its weights once, which is what bounds a small-batch
    step on a GPU (kernel launches, weight bytes). :func:`forward` takes either layout; for inference only (the
    fused weights are copies, not the trained parameters), and only without tensor parallelism (a fused weight
    split over ``tensor`` would not split by heads)."""

    def fuse(layer):
        out = dict(layer)
        for name, parts in FUSED.items():
            if all(k in out for k in parts):
                out[name] = jnp.concatenate([out.pop(k) for k in parts], axis=-1)
        return out

    layers = params["layers"]
    return {**params, "layers": [fuse(p) for p in layers] if isinstance(layers, list) else fuse(layers)}


def logits_from_hidden(cfg: ModelConfig, params: dict[str, Any], h: jax.Array) -> jax.Array:
    """Final hidden states [..., D] (already normed) -> float32 logits [..., V]."""
    cd = cfg.jnp_dtype
    h = constrain_batch(h)  # batch-sharded activations under a mesh (see distributed.constrain_batch)
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1]).astype(cd)  # one 2-D GEMM, and a 2-D GEMM for the weight gradient
    if cfg.tie_word_embeddings:
        out = matmul(h2, params["embed"], transpose_w=True)
    else:
        out = matmul(h2, params["lm_head"])
    return out.reshape(lead + (out.shape[-1],)).astype(jnp.float32)


def _head_weight(cfg: ModelConfig, params: dict[str, Any]) -> tuple[jax.Array, bool]:
    """The LM head weight and whether it is stored [V, D] (the tied embedding) rather than [D, V]."""
    if cfg.tie_word_embeddings:
        return params["embed"], True
    return params["lm_head"], False


def logits_at_ids(cfg: ModelConfig, params: dict[str, Any], h: jax.Array, ids: jax.Array) -> jax.Array:
    """The logits of K given ids per position, without the vocabulary-wide GEMM: h [..., D] (normed), ids
    [..., K] -> float32 [..., K], equal to ``take_along_axis(logits_from_hidden(h), ids)``.

    A soft step's log-prob needs only these (the Gumbel density renormalises over its K ids, so the full softmax's
    normaliser cancels): K dot products of D per position instead of V. The gradient reaches the head weight as a
    scatter-add into its K rows per position."""
    cd = cfg.jnp_dtype
    w, vd = _head_weight(cfg, params)
    ids = ids.astype(jnp.int32)
    if vd:
        rows = jnp.take(w, ids, axis=0)  # [..., K, D]
    else:
        rows = jnp.moveaxis(jnp.take(w, ids, axis=1), 0, -1)  # [D, ..., K] -> [..., K, D]
    return jnp.einsum("...d,...kd->...k", h.astype(cd), rows.astype(cd), preferred_element_type=jnp.float32)


def vocab_logprobs(cfg: ModelConfig, params: dict[str, Any], h: jax.Array, targets: jax.Array, need: jax.Array,
                   *, temperature=1.0, chunk_size: int | None = None) -> jax.Array:
    """``log_softmax(logits_from_hidden(h) / temperature)[targets]`` where ``need``, 0 elsewhere, computing the
    vocabulary-wide logits only for (about) the positions that need them (``ops.vocab_logprobs``).
    h [B, T, D] normed hidden states, targets [B, T] int, need [B, T] bool -> [B, T] float32."""
    w, vd = _head_weight(cfg, params)
    return vocab_lp.vocab_logprobs(h, w, targets, need, vocab_major=vd, compute_dtype=cfg.jnp_dtype,
                                   temperature=temperature, chunk_size=chunk_size)


def forward(
    cfg: ModelConfig,
    params: dict[str, Any],
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    cache: dict[str, Any] | None = None,
    return_hidden: bool = False,
    last_only: bool = False,
    fresh_cache: bool = False,
    decode_attention: str = "xla",
    prefix: tuple | None = None,
    return_kv: bool = False,
):
    """Run the decoder on ``params`` (a :meth:`Transformer.param_tree`, or :func:`unstack_layers` of one).

    Exactly one of ``input_ids`` [B, T] (int) or ``inputs_embeds`` [B, T, D] must be given.
    ``attention_mask`` [B, T] marks real tokens (1) and padding (0), left or right padding alike.
    ``positions`` [B, T] overrides the RoPE positions (default: count of real tokens before each one).
    Returns float32 logits [B, T, V] (or the normed hidden states [B, T, D] with ``return_hidden``; ``last_only``
    keeps only the last position, [B, V] / [B, D], and skips the LM head elsewhere); with a ``cache``, returns
    ``(out, new_cache)``. ``fresh_cache`` promises the cache is empty (index 0, a prefill): attention then runs over
    the T new tokens only, not over all S slots of the cache (scores [B, H, T, T], not [B, H, T, S]).
    ``decode_attention`` ("xla" | "pallas" | "pallas_gpu" | "pallas_tpu"): how a one-token step attends over the
    cache; the Pallas kernels read each row's valid slots only (``ops.attention.decode_attention``: "pallas" picks
    the TPU kernel on TPU and the GPU one elsewhere; a cache length that is a multiple of 16, 128 for TPU's).
    Stacked layers run as a ``lax.scan`` (``cfg.scan_layers``) or unrolled; a list of per-layer dicts runs unrolled.
    The cache's ``k``/``v`` follow the layers: stacked arrays or per-layer lists.

    A shared prompt, for training (no cache; the plain XLA attention whatever ``cfg.attention``): ``return_kv``
    also returns each layer's keys and values, ``(out, (k, v))`` with ``k``/``v`` [L, B, Hkv, T, hd] in the compute
    dtype (lists of L arrays for per-layer weights); ``prefix=(k, v, mask)`` (``k``/``v`` laid out so, [.., B, Hkv,
    P, hd], ``mask`` [B, P] their real slots) puts those keys and values in front of each row's own: every token
    sees the prefix's real slots and its own row causally, as if the prefix's tokens came first in the row (pass
    ``positions`` that continue the prefix's). Gradients flow into the prefix, so a prompt run once with
    ``return_kv`` and gathered for the rows that continue it trains as it would inside each row.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    cd = cfg.jnp_dtype
    if input_ids is not None:
        x = jnp.take(params["embed"], input_ids, axis=0).astype(cd)
    else:
        if inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds last dim {inputs_embeds.shape[-1]} != hidden_size {cfg.hidden_size}")
        x = inputs_embeds.astype(cd)
    B, T = x.shape[:2]
    mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)

    shared = prefix is not None or return_kv
    if shared and (cache is not None or (prefix is not None and return_kv)):
        raise ValueError("prefix / return_kv are for whole-sequence passes (no cache), one of them per call")
    if cache is None:
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        key_valid = mask
        q_slot = jnp.arange(T)
        start = None
    else:
        start = cache["index"]
        if positions is None:
            positions = cache["pos"][:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, start))
        q_slot = start + jnp.arange(T)
    S = key_valid.shape[1]
    # [B, T, S] attention mask: causal in slot order and the key slot holds a real token.
    attn_mask = (jnp.arange(S)[None, None, :] <= q_slot[None, :, None]) & key_valid[:, None, :]
    local = cache is not None and fresh_cache
    if decode_attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
    ragged = None
    if cache is not None and not local and T == 1 and decode_attention != "xla":
        # a row's valid slots are one run: its left-padded prompt's real tokens, then every step since
        kernel = attention.decode_kernel(None if decode_attention == "pallas" else decode_attention[len("pallas_"):])
        ragged = (jnp.argmax(key_valid, axis=1).astype(jnp.int32), jnp.broadcast_to(start + T, (B,)), kernel)
    if local:  # the new tokens sit in slots [0, T): attend over those only
        attn_mask = (jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]) & mask[:, None, :]
    if prefix is not None:  # [B, T, P + T]: the prefix's real slots, then this row's own causally
        pmask = prefix[2].astype(bool)
        attn_mask = jnp.concatenate([jnp.broadcast_to(pmask[:, None, :], (B, T, pmask.shape[1])), attn_mask], 2)
    perm = seqlen = None
    impl = resolve_attention(cfg) if cache is None and not shared else "xla"
    fused = impl == "cudnn"
    if impl == "splash":  # causal attention within segments: a row's real tokens (1) apart from its padding (0)
        seqlen = mask.astype(jnp.int32)
    if fused:
        # Fused attention with a causal + padding mask, which needs each row's real tokens first: reorder every row
        # stably (real tokens in order, then the padding), run all layers on that order (everything but attention
        # is per position, RoPE takes the permuted positions) and restore the order at the end. Exact for any
        # mask: a real query at slot t sees the real keys at slots <= t in both orders.
        if attention_mask is not None:
            perm = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)
            x = jnp.take_along_axis(x, perm[..., None], axis=1)
            positions = jnp.take_along_axis(positions, perm, axis=1)
            seqlen = mask.sum(axis=1).astype(jnp.int32)
    cos, sin = rope_tables(cfg, positions)

    layer_params = params["layers"]
    per_layer = isinstance(layer_params, (list, tuple))
    # how the backward pass keeps each layer's residuals (ops.residuals: XLA:CPU-specific policies)
    scanned = cfg.scan_layers and not per_layer
    marks = ckpt.residual_marks(cfg.remat, scanned, cd)
    mode = "prefix" if prefix is not None else ("kv_out" if return_kv else None)
    body = ckpt.checkpoint_layer(_make_layer_fn(cfg, cos, sin, attn_mask, start, local, impl, seqlen, marks,
                                                ragged, mode), marks, cfg.remat, scanned, cd)

    kv_in = None if cache is None else (cache["k"], cache["v"])
    if shared:  # each layer takes its prefix slice (or None) and returns its own keys / values (or None)
        pkv = None if prefix is None else (prefix[0], prefix[1])
        if scanned:
            def shared_fn(h, xs):
                return body(h, xs[0], None, xs[1])
            x, kv_out = jax.lax.scan(shared_fn, x, (layer_params, pkv))
        else:
            outs = []
            for i in range(cfg.num_layers):
                p = layer_params[i] if per_layer else {k: v[i] for k, v in layer_params.items()}
                pi = None if pkv is None else (pkv[0][i], pkv[1][i])
                x, kv = body(x, p, None, pi)
                outs.append(kv)
            kv_out = None if not return_kv else (
                ([o[0] for o in outs], [o[1] for o in outs]) if per_layer
                else (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])))
    elif per_layer:
        ks, vs = [], []
        for i, p in enumerate(layer_params):
            x, kv = body(x, p, None, None if kv_in is None else (kv_in[0][i], kv_in[1][i]))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        kv_out = None if cache is None else (ks, vs)
    elif cfg.scan_layers:
        def scan_fn(carry, xs):
            h, kv = carry
            p, i = xs
            h, kv = body(h, p, i, kv)
            return (h, kv), None
        (x, kv_out), _ = jax.lax.scan(scan_fn, (x, kv_in), (layer_params, jnp.arange(cfg.num_layers)))
    else:
        kv_out = kv_in
        for i in range(cfg.num_layers):
            p = {k: v[i] for k, v in layer_params.items()}
            x, kv_out = body(x, p, i, kv_out)

    if perm is not None:
        x = jnp.take_along_axis(x, jnp.argsort(perm, axis=1)[..., None], axis=1)
    if last_only:
        x = x[:, -1]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    out = x if return_hidden else logits_from_hidden(cfg, params, x)
    if return_kv:
        return out, kv_out
    if cache is None:
        return out
    new_cache = {
        "k": kv_out[0],
        "v": kv_out[1],
        "mask": key_valid,
        "pos": cache["pos"] + mask.sum(axis=1).astype(jnp.int32),
        "index": start + T,
    }
    return out, new_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, per_layer: bool = False
               ) -> dict[str, Any]:
    """An empty KV cache: ``k``/``v`` [L, B, Hkv, S, hd] (or, ``per_layer``, lists of L arrays [B, Hkv, S, hd])."""
    dtype = dtype or cfg.jnp_dtype
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        k = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
    else:
        k = jnp.zeros((cfg.num_layers,) + shape, dtype)
        v = jnp.zeros((cfg.num_layers,) + shape, dtype)
    return {
        "k": k,
        "v": v,
        "mask": jnp.zeros((batch_size, max_len), bool),
        "pos": jnp.zeros((batch_size,), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def inv_frequencies(cfg: ModelConfig) -> jax.Array:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_l = jnp.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return jnp.where(medium, smoothed, inv_l)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, hd] in float32 (HF's rotate-half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_frequencies(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def resolve_attention(cfg: ModelConfig) -> str:
    """``cfg.attention`` -> "xla" or "cudnn" (``ops.attention.resolve``)."""
    return attention.resolve(cfg.attention, cfg.jnp_dtype, cfg.head_dim)


def _make_layer_fn(cfg: ModelConfig, cos, sin, attn_mask, start, local: bool = False, impl: str = "xla",
                   seqlen=None, residuals: str | None = None, ragged=None, mode: str | None = None):
    """One decoder layer ``(x, p, i, kv) -> (x, kv)``. ``impl``: the whole-sequence attention path ("xla",
    "cudnn" with rows reordered real-tokens-first and ``seqlen`` real tokens, "splash" with ``seqlen`` the segment
    ids). ``residuals`` marks the values the backward pass saves for
    ``forward``'s checkpoint policies (see ``RESIDUAL``): "input" the layer input, "all" every residual, None none
    (the marks force bf16 rounding where XLA could otherwise keep excess precision, so unmarked passes stay as
    they were). ``mode`` (``forward``'s shared prompt): "kv_out" returns the layer's keys / values as ``kv``;
    "prefix" takes ``kv`` as the prefix's [B, Hkv, P, hd] and returns None."""
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scale = 1.0 / math.sqrt(hd)
    mark_all = residuals == "all"
    keep = ckpt.saved_residual if mark_all else (lambda a: a)

    def layer(x, p: dict[str, Any], i, kv):
        B, T, _ = x.shape
        x = constrain_batch(x)  # no-op without distributed.activation_sharding
        if residuals:
            x = ckpt.saved_residual(x, ckpt.LAYER_INPUT)
        h = keep(rms_norm(x, p["attn_norm"], cfg.rms_norm_eps))
        if mode is None and kv is None and impl == "xla" and "wq" in p and attention_block.attention_block_on(h):
            o = attention_block.attention_block(h, p["wq"], p["wk"], p["wv"], p.get("bq"), p.get("bk"), p.get("bv"), cos, sin,
                                 attn_mask, (H, Hkv, hd, scale, residuals is not None))
            return _mlp_block(cfg, x, o, p, keep, keep_o=residuals is None), kv
        if "wqkv" in p:  # fuse_projections' layout: one GEMM, the same per-element roundings
            q, k, v = jnp.split(dense(h, p["wqkv"], p.get("bqkv")), (H * hd, (H + Hkv) * hd), axis=-1)
        else:
            q, k, v = (dense(h, p[w], p.get(b)) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, Hkv, hd), v.reshape(B, T, Hkv, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if impl == "cudnn":  # whole sequences, no cache, rows reordered real-tokens-first (see forward)
            o = attention.attention_dpa(q, k, v, seqlen, scale).reshape(B, T, H * hd)
            return _mlp_block(cfg, x, o, p, keep), kv
        if impl == "splash":  # whole sequences, no cache
            o = attention.attention_splash(q, k, v, seqlen, scale).reshape(B, T, H * hd)
            return _mlp_block(cfg, x, o, p, keep), kv
        kt = attention.heads_major(k)  # [B, Hkv, T, hd]: this call's keys / values
        vt = attention.heads_major(v)
        if mode is not None:
            qg = attention.group_queries(q, Hkv)
            if mode == "prefix":
                pk, pv = kv
                o = attention.attention_core(qg, jnp.concatenate([pk.astype(kt.dtype), kt], 2),
                                             jnp.concatenate([pv.astype(vt.dtype), vt], 2), attn_mask, scale,
                                             mark_all, False)
                kv = None
            else:
                o = attention.attention_core(qg, kt, vt, attn_mask, scale, mark_all, True)
                kv = (kt, vt)
            o = attention.ungroup_queries(o, T).reshape(B, T, H * hd)
            return _mlp_block(cfg, x, o, p, keep), kv
        if kv is not None:
            ck, cv = kv  # [L, B, Hkv, S, hd] with a layer index i, or one layer's [B, Hkv, S, hd] (i None)
            if i is None:
                ck = update_slots(ck, kt.astype(ck.dtype), (0, 0, start, 0))
                cv = update_slots(cv, vt.astype(cv.dtype), (0, 0, start, 0))
            else:
                ck = jax.lax.dynamic_update_slice(ck, kt[None].astype(ck.dtype), (i, 0, 0, start, 0))
                cv = jax.lax.dynamic_update_slice(cv, vt[None].astype(cv.dtype), (i, 0, 0, start, 0))
            kv = (ck, cv)
            if not local:  # attend over every slot of the cache (a fresh-cache prefill keeps this call's keys)
                if i is None:
                    kt, vt = ck.astype(x.dtype), cv.astype(x.dtype)
                else:
                    kt = jax.lax.dynamic_index_in_dim(ck, i, 0, keepdims=False).astype(x.dtype)
                    vt = jax.lax.dynamic_index_in_dim(cv, i, 0, keepdims=False).astype(x.dtype)
        if ragged is not None:  # one decode step, each row's valid slots [start, length) only
            r_start, r_len, kernel = ragged
            ck, cv = kv if i is not None else (kt, vt)  # stacked caches go whole, with the layer index
            o = attention.decode_attention(q[:, 0], ck, cv, r_start, r_len, scale, kernel=kernel,
                                           layer=i).reshape(B, T, H * hd)
            return _mlp_block(cfg, x, o, p, keep), kv
        # the layout [B, Hkv, G*T, hd] keeps every dot (and its gradients) a plain batched GEMM on XLA:CPU and GPU
        qg = attention.group_queries(q, Hkv)
        if kv is None:  # a whole-sequence pass (log-probs, training): the written-out backward
            o = attention.attention_core(qg, kt, vt, attn_mask, scale, mark_all, True)
        else:
            o = attention.attention_probs_out(qg, kt, vt, attn_mask, scale)[1].astype(x.dtype)
        o = attention.ungroup_queries(o, T).reshape(B, T, H * hd)
        return _mlp_block(cfg, x, o, p, keep), kv

    return layer


def _mlp_block(cfg: ModelConfig, x, o, p, keep=lambda a: a, keep_o: bool = True):
    """The rest of a layer after attention: output projection, residual, MLP, residual (``keep`` marks residuals;
    ``keep_o`` False: ``o`` is saved already)."""
    x = keep(x + dense(keep(o) if keep_o else o, p["wo"], p.get("bo")))
    h = keep(rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))
    if "w_gate_up" in p:  # fuse_projections' layout (inference): one GEMM for the gate and up projections
        g, u = jnp.split(dense(h, p["w_gate_up"]), 2, axis=-1)
        return constrain_batch(x + dense(mlp.swiglu(g, u), p["w_down"]))
    rows = mlp.mlp_tile_rows(h)
    if rows:
        y = mlp.swiglu_mlp(h.reshape(-1, h.shape[-1]), p["w_gate"], p["w_up"], p["w_down"], rows)
        return constrain_batch(x + y.reshape(x.shape))
    g = keep(dense(h, p["w_gate"]))
    u = keep(dense(h, p["w_up"]))
    x = x + dense(keep(mlp.swiglu(g, u)), p["w_down"])
    return constrain_batch(x)
