"""One Flax NNX decoder for Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen and Llama 3.x / SmolLM2.

Layout: the per-layer weights are stacked along a leading layer axis ``[L, ...]`` so the layers run as one
``lax.scan`` (compile time flat in depth) or, with ``scan_layers=False``, unrolled. :func:`forward` is the functional
core (config + a dict of weights); :func:`unstack_layers` turns the stack into per-layer weights, which run unrolled
(the rollout engine's layout on CPU). Linear weights are stored ``[in, out]``. Shapes: B batch, T query length,
S cache slots, D width, H query heads, G = H / Hkv, hd head dim, V vocab.

The KV cache is a plain dict (a pytree) of fixed size, so decoding compiles once:
  ``k, v``: [L, B, Hkv, S, hd]   keys / values per slot (per-layer weights: lists of L arrays [B, Hkv, S, hd])
  ``mask``: [B, S] bool          slot holds a real (non-padding) token
  ``pos``:  [B] int32            number of real tokens seen per row (the next RoPE position)
  ``index``: [] int32            next slot to write (shared by the batch: prompts are left-padded)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from softgrpo_jax.distributed import constrain_batch, current_activation_mesh
from softgrpo_jax.models.config import ModelConfig

NEG_INF = -1e30

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


# Rows of [rows, V] float32 logits live at once in ``vocab_logprobs`` when no chunk size is given: ~128 MB.
VOCAB_CHUNK_BYTES = 128 * 2**20
# Single-device XLA:CPU: ``vocab_logprobs`` works in chunks of this many rows and forms each chunk's logits in
# blocks of this many vocabulary columns, so a block's float32 logits (8 MB) and its gradient GEMMs' operands stay
# small, and the head's gradient is written block by block instead of adding a whole [V, D] float32 array per
# chunk; None: one block of the whole vocabulary (chunks of ~``VOCAB_CHUNK_BYTES``), as on other backends.
# SmolLM2's head, 16 x 256 positions, V = 49152: forward 489 -> 295 ms, forward + backward 2.37 -> 1.07 s
# (``benchmarks/bench_cpu_head.py``); the GRPO update ~1.1x. 1024 rows rather than 2048: a chunk runs whole even
# when few of its rows are needed (a SofT-GRPO batch's discrete answer tokens).
VOCAB_BLOCK: tuple[int, int] | None = (1024, 2048)


def _vocab_block(vocab_size: int) -> int:
    """Vocabulary columns per block of ``vocab_logprobs``: ``VOCAB_BLOCK``'s on single-device XLA:CPU when the
    vocabulary is wider, else the whole vocabulary."""
    if VOCAB_BLOCK and _cpu_single_device() and vocab_size > VOCAB_BLOCK[1]:
        return VOCAB_BLOCK[1]
    return vocab_size


def vocab_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk of ``vocab_logprobs``: ``chunk_size`` if given; else with vocabulary blocks (``VOCAB_BLOCK``)
    its rows, otherwise ~``VOCAB_CHUNK_BYTES`` of float32 logits (a multiple of 8, between 64 and 4096)."""
    if chunk_size:
        return int(chunk_size)
    if _vocab_block(vocab_size) < vocab_size:
        return VOCAB_BLOCK[0]
    return max(64, min(4096, VOCAB_CHUNK_BYTES // (4 * vocab_size) // 8 * 8))


def vocab_logprobs(cfg: ModelConfig, params: dict[str, Any], h: jax.Array, targets: jax.Array, need: jax.Array,
                   *, temperature=1.0, chunk_size: int | None = None) -> jax.Array:
    """``log_softmax(logits_from_hidden(h) / temperature)[targets]`` where ``need``, 0 elsewhere, computing the
    vocabulary-wide logits only for (about) the positions that need them.

    h [B, T, D] normed hidden states, targets [B, T] int, need [B, T] bool -> [B, T] float32.

    The needed positions are moved to the front (a stable sort, per batch row under a multi-device mesh so the
    batch stays sharded; over the flattened batch otherwise) and processed in chunks of ``vocab_chunk_rows`` rows
    by a loop that runs only as many chunks as hold needed positions: only [rows, V] logits (on single-device
    XLA:CPU [rows, block] ones, see ``VOCAB_BLOCK``) are ever live, and a batch with no needed position (a
    SofT-GRPO batch whose scored steps are all soft) never touches the vocabulary.
    Forward and backward are written out (``_vocab_lp``): the forward combines the blocks' log-sum-exps
    (``_logsumexp_rows``); the backward recomputes each block's logits, forms ``(onehot - softmax) * g /
    temperature`` with the softmax as exp(logits - lse) from the forward's saved log-sum-exp, and writes the
    head's gradient block by block (accumulated over the chunks in float32)."""
    B, T, D = h.shape
    mesh = current_activation_mesh()
    per_row = mesh is not None and mesh.size > 1
    if not per_row:  # one sort over all positions: chunks pack needed positions of every row
        h, targets, need = h.reshape(1, B * T, D), targets.reshape(1, B * T), need.reshape(1, B * T)
    R, N = h.shape[:2]
    rows = vocab_chunk_rows(cfg.vocab_size, chunk_size)
    c = max(1, min(N, rows // R))  # positions per chunk and row
    order = jnp.argsort(~need, axis=1, stable=True)
    count = jnp.max(jnp.sum(need, axis=1))
    hs = jnp.take_along_axis(h, order[..., None], axis=1)
    ts = jnp.take_along_axis(targets.astype(jnp.int32), order, axis=1)
    n_chunks = -(-N // c)
    pad = n_chunks * c - N
    if pad:
        hs = jnp.pad(hs, ((0, 0), (0, pad), (0, 0)))
        ts = jnp.pad(ts, ((0, 0), (0, pad)))
    trips = (count + c - 1) // c
    w, vd = _head_weight(cfg, params)
    static = (c, float(temperature), vd, jnp.dtype(cfg.jnp_dtype).name, _vocab_block(cfg.vocab_size))
    lp_sorted = _vocab_lp(hs, w, ts, trips, static)[:, :N]
    inv = jnp.argsort(order, axis=1)
    lp = jnp.take_along_axis(lp_sorted, inv, axis=1)
    lp = jnp.where(need, lp, 0.0)
    return lp.reshape(B, T)


def _vocab_chunk(hs, i, c, *xs):
    """Chunk i's rows: hs [R, Np, D] -> x [R*c, D], and each [R, Np] array of ``xs`` -> [R*c]."""
    x = jax.lax.dynamic_slice_in_dim(hs, i * c, c, axis=1)
    return (x.reshape(-1, x.shape[-1]),) + tuple(jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1).reshape(-1)
                                                 for a in xs)


def _head_blocks(w, vd, vb, cd):
    """The head weight cast to ``cd`` and zero-padded to whole blocks of ``vb`` vocabulary entries (along axis 0 if
    ``vd``, the tied [V, D] embedding, else axis 1), with the vocabulary size and the block count."""
    V = w.shape[0] if vd else w.shape[1]
    wc = w.astype(cd)
    if V % vb:
        wc = jnp.pad(wc, ((0, -V % vb), (0, 0)) if vd else ((0, 0), (0, -V % vb)))
    return wc, V, -(-V // vb)


def _block_logits(x, wc, j, static, V):
    """Block j's float32 logits [rows, vb] of x [rows, D] (columns past the vocabulary -inf), and its weight."""
    _, temp, vd, _, vb = static
    wb = jax.lax.dynamic_slice_in_dim(wc, j * vb, vb, axis=0 if vd else 1) if wc.shape[0 if vd else 1] > vb else wc
    logits = _mm(x, wb, vd) / temp
    if V % vb:
        logits = jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + j * vb < V, logits, -jnp.inf)
    return wb, logits


def _over_blocks(blk, nb, init):
    """``blk(j, carry)`` over the vocabulary blocks (called once, without a loop, for one block)."""
    return blk(0, init) if nb == 1 else jax.lax.fori_loop(0, nb, blk, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _vocab_lp(hs, w, ts, trips, static):
    return _vocab_lp_fwd(hs, w, ts, trips, static)[0]


def _vocab_lp_fwd(hs, w, ts, trips, static):
    c, temp, vd, cd, vb = static
    R, Np = ts.shape

    def run(_):
        wc, V, nb = _head_blocks(w, vd, vb, cd)

        def body(i, out):
            x, t = _vocab_chunk(hs, i, c, ts)
            x = x.astype(cd)

            def blk(j, carry):  # the running log-sum-exp and the target's logit (from the block holding it)
                lse, picked = carry
                _, logits = _block_logits(x, wc, j, static, V)
                tj = t - j * vb
                hit = (tj >= 0) & (tj < vb)
                at = jnp.take_along_axis(logits, jnp.clip(tj, 0, vb - 1)[:, None], axis=-1)[:, 0]
                return jnp.logaddexp(lse, _logsumexp_rows(logits)), picked + jnp.where(hit, at, 0.0)

            lse, picked = _over_blocks(blk, nb, (jnp.full(t.shape, -jnp.inf), jnp.zeros(t.shape, jnp.float32)))
            return tuple(jax.lax.dynamic_update_slice_in_dim(o, a.reshape(R, c), i * c, axis=1)
                         for o, a in zip(out, (picked - lse, lse)))

        return jax.lax.fori_loop(0, trips, body, (jnp.zeros((R, Np), jnp.float32),) * 2)

    # no chunk to run (every scored step soft): not even the weight's cast (a [V, D] pass)
    out, lse = jax.lax.cond(trips > 0, run, lambda _: (jnp.zeros((R, Np), jnp.float32),) * 2, None)
    return out, (hs, w, ts, trips, lse)


def _logsumexp_rows(x: jax.Array) -> jax.Array:
    """``logsumexp(x, axis=-1)`` of float32 [N, V] logits. On XLA:CPU the sum of the exponentials runs as a GEMV
    against ones: XLA fuses the exp into a YNNPACK reduction that ran at ~2 ns per element, while the exponentials
    written out and summed by the GEMV take half the time, at the price of one more [N, V] float32 buffer (a
    [680, 49152] chunk: 62 -> 30 ms, ``benchmarks/bench_cpu_lse.py --no-faults``; the GRPO update 1.10x)."""
    m = jnp.max(x, axis=-1)
    e = jnp.exp(x - m[:, None])
    if _cpu_single_device():  # (sharded runs and other backends: the plain sum, as the other CPU-only paths)
        total = jnp.dot(e, jnp.ones((x.shape[-1],), x.dtype), preferred_element_type=jnp.float32)
    else:
        total = jnp.sum(e, axis=-1)
    return m + jnp.log(total)


def _vocab_lp_bwd(static, res, g):
    hs, w, ts, trips, lse = res

    def run(_):
        return _vocab_lp_bwd_loop(static, hs, w, ts, trips, g, lse)

    # nothing to do without a chunk: zeros, without the weight's cast
    dh, dw = jax.lax.cond(trips > 0, run, lambda _: (jnp.zeros_like(hs), jnp.zeros(w.shape, jnp.float32)), None)
    return dh, dw.astype(w.dtype), None, None


def _vocab_lp_bwd_loop(static, hs, w, ts, trips, g, lse):
    c, temp, vd, cd, vb = static
    wc, V, nb = _head_blocks(w, vd, vb, cd)
    R, Np, D = hs.shape
    axis = 0 if vd else 1  # the head's gradient is laid out as the weight: [V, D] (tied) or [D, V]
    g = g / temp

    def body(i, carry):
        dh, dw = carry
        x, t, gc, lc = _vocab_chunk(hs, i, c, ts, g, lse)
        x = x.astype(cd)

        def blk(j, carry):  # block j's share of dx, its slice of the head's gradient
            dx, dw = carry
            wb, logits = _block_logits(x, wc, j, static, V)
            # the softmax from the forward's log-sum-exp: one elementwise pass, no max / sum reductions
            p = jnp.exp(logits - lc[:, None])
            onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + j * vb == t[:, None]
            gl = (gc[:, None] * (onehot.astype(jnp.float32) - p)).astype(cd)  # d lp / d (x W), cast as _matmul16's
            dx = dx + _mm(gl, wb, not vd)
            dwb = _tn_dot(gl, x) if vd else _tn_dot(x, gl)
            if nb == 1:
                return dx, dw + dwb
            old = jax.lax.dynamic_slice_in_dim(dw, j * vb, vb, axis=axis)
            return dx, jax.lax.dynamic_update_slice_in_dim(dw, old + dwb, j * vb, axis=axis)

        dx, dw = _over_blocks(blk, nb, (jnp.zeros((x.shape[0], D), jnp.float32), dw))
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dx.astype(hs.dtype).reshape(R, c, D), i * c, axis=1)
        return dh, dw

    dh, dw = jax.lax.fori_loop(0, trips, body, (jnp.zeros_like(hs), jnp.zeros(wc.shape, jnp.float32)))
    return dh, jax.lax.slice_in_dim(dw, 0, V, axis=axis)


_vocab_lp.defvjp(_vocab_lp_fwd, _vocab_lp_bwd)


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
):
    """Run the decoder on ``params`` (a :meth:`Transformer.param_tree`, or :func:`unstack_layers` of one).

    Exactly one of ``input_ids`` [B, T] (int) or ``inputs_embeds`` [B, T, D] must be given.
    ``attention_mask`` [B, T] marks real tokens (1) and padding (0), left or right padding alike.
    ``positions`` [B, T] overrides the RoPE positions (default: count of real tokens before each one).
    Returns float32 logits [B, T, V] (or the normed hidden states [B, T, D] with ``return_hidden``; ``last_only``
    keeps only the last position, [B, V] / [B, D], and skips the LM head elsewhere); with a ``cache``, returns
    ``(out, new_cache)``. ``fresh_cache`` promises the cache is empty (index 0, a prefill): attention then runs over
    the T new tokens only, not over all S slots of the cache (scores [B, H, T, T], not [B, H, T, S]).
    Stacked layers run as a ``lax.scan`` (``cfg.scan_layers``) or unrolled; a list of per-layer dicts runs unrolled.
    The cache's ``k``/``v`` follow the layers: stacked arrays or per-layer lists.
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
    if local:  # the new tokens sit in slots [0, T): attend over those only
        attn_mask = (jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]) & mask[:, None, :]
    perm = seqlen = None
    fused = cache is None and resolve_attention(cfg) == "cudnn"
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
    # a layer scan on XLA:CPU in a 16-bit dtype saves its residuals as uint16 bits (see _RESIDUAL)
    bits = (RESIDUALS_AS_BITS and cfg.scan_layers and not per_layer and jnp.dtype(cd).itemsize == 2
            and jax.default_backend() == "cpu")
    body = _make_layer_fn(cfg, cos, sin, attn_mask, start, local, fused, seqlen,
                          residuals=None if not bits else "input" if cfg.remat else "all")
    if cfg.remat:
        body = jax.checkpoint(body, policy=_REMAT_POLICY if bits else jax.checkpoint_policies.nothing_saveable)
    elif bits:
        body = jax.checkpoint(body, policy=_SAVE_POLICY)
    elif (SAVE_ONLY_DOTS_F32 and cfg.scan_layers and not per_layer and jnp.dtype(cd).itemsize == 4
          and jax.default_backend() == "cpu"):
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    kv_in = None if cache is None else (cache["k"], cache["v"])
    if per_layer:
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


# The values a layer's backward pass needs, named for ``jax.checkpoint``'s ``save_only_these_names`` policy. A bf16
# layer scan on XLA:CPU runs under that policy: without remat (``_SAVE_POLICY``) it saves the residuals a plain
# backward saves, with remat (``_REMAT_POLICY``) only each layer's input, and either way 16-bit floats are stored as
# their uint16 bits. A residual saved in bf16 is stacked across the scan by a bf16 dynamic-update-slice, which
# XLA:CPU computes in float32 (30 ms per layer for a [16, 256, 1536] slice), and the backward scan then converts
# each whole stack to float32 (1.2 s for one [30, 16, 256, 1536] residual); the same bits as uint16 are updated and
# sliced in place, and only bitcasts are recomputed. SmolLM2 update, 16 x 256 tokens, bf16 without remat: 24-25 ->
# ~10 s; with remat 1-4% faster (benchmarks/RESULTS.md).
RESIDUALS_AS_BITS = True  # the switch (tests compare against False)
_RESIDUAL = "softgrpo_residual"
_LAYER_INPUT = "softgrpo_layer_input"
# the attention block's output and softmax statistics (``_attention_block``): saved under remat too, so the
# recomputed layer forward skips the attention
_ATTENTION_SAVED = "softgrpo_attention_saved"
_SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(_LAYER_INPUT, _RESIDUAL, _ATTENTION_SAVED)
_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(_LAYER_INPUT, _ATTENTION_SAVED)
# A float32 layer scan on XLA:CPU without remat saves only its weight GEMMs' outputs for the backward pass
# (``dots_with_no_batch_dims_saveable``: q, k, v, the attention output projection's input, gate, up) and
# recomputes the rest in the backward scan: the norms, RoPE, the SwiGLU and the attention's scores and
# probabilities. What a plain backward saves is stacked across the scan (zero-filled, copied in, copied out:
# ~6 GB for the SmolLM2 update at 16 x 256 tokens); recomputing the cheap part instead ran that update 1.09x
# faster (median of 6 alternating updates each, faster in 3 of 3 rounds; 2-core AMD EPYC, benchmarks/RESULTS.md,
# session 14).
SAVE_ONLY_DOTS_F32 = True  # the switch (tests compare against False)


def _named_residual(a: jax.Array, name: str = _RESIDUAL) -> jax.Array:
    """``a`` named as a residual worth saving: 16-bit floats by their bits (see ``_RESIDUAL``), value unchanged."""
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2:
        bits = checkpoint_name(jax.lax.bitcast_convert_type(a, jnp.uint16), name)
        return jax.lax.bitcast_convert_type(bits, a.dtype)
    return checkpoint_name(a, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def saved_residual(a: jax.Array, name: str = _RESIDUAL) -> jax.Array:
    """Identity whose value is saved for the backward pass under ``_SAVE_POLICY`` (a GEMM's input or output that a
    backward needs, a norm's input): without the mark, that policy would recompute it. Inert elsewhere."""
    return a


saved_residual.defvjp(lambda a, name: (_named_residual(a, name), None), lambda name, _, g: (g,))


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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd]; cos/sin [B, T, hd]. Computed in float32 and rounded once to x's dtype (HF rounds after
    each of its bf16 products: differences within one bf16 ulp). XLA:CPU has no bf16 arithmetic and rounds after
    every op of a bf16 chain; in float32 the rotation's forward + backward for SmolLM2's queries (16 x 256
    tokens) takes 0.9 ms instead of 8.6 (benchmarks/bench_cpu_attention.py)."""
    xf = x.astype(jnp.float32)
    return (xf * cos[:, :, None, :] + _rotate_half(xf) * sin[:, :, None, :]).astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half: [x1, x2] -> [-x2, x1] over the last dim (its transpose is minus itself)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _dense(x, w, b=None):
    # a 2-D GEMM ([B*T, D] x [D, F]): its weight gradient is then one GEMM too; XLA:CPU runs the
    # two-batch-dim contraction of "btd,btf->df" several times slower
    lead = x.shape[:-1]
    y = matmul(x.reshape(-1, x.shape[-1]), w)
    y = y.reshape(lead + (w.shape[-1],))
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """``x @ w`` (or ``x @ w.T``) for x [N, D] in the compute dtype and a weight w of any dtype (cast to x's):
    float32 result, float32 accumulation.

    With 16-bit x, the backward pass is written out (``_matmul16``) the way mixed-precision training does it
    (torch autocast, MaxText): the output cotangent is cast to x's dtype, so both gradient GEMMs run in bf16 with
    float32 accumulation, and the weight gradient is returned in the weight's own dtype straight from the float32
    accumulator (a float32 master weight gets an unrounded gradient). Plain autodiff would instead multiply the
    float32 cotangent by the bf16 operands, i.e. two float32 GEMMs."""
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return _matmul16(x, w, transpose_w)
    return _mm(x, w.astype(x.dtype), transpose_w)


def _mm(a, b, transpose_b):
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile(n: int) -> int:
    """The largest power of two <= 64 that divides n."""
    t = 64
    while n % t:
        t //= 2
    return t


def _tn_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` for a [N, M], b [N, K] (the weight gradient: both operands' token dim contracted), float32.

    On XLA:CPU (jax 0.10) a bf16 dot runs on its fast AMX / YNNPACK path only when the contracting dim of its left
    operand is physically innermost; otherwise the whole GEMM is converted to float32 (230 against 820 GFLOP/s
    here, benchmarks/RESULTS.md). A plain ``a.T`` (or a copy, or an optimisation barrier) is folded back into the
    dot's dimension numbers before that check, and XLA:CPU's 2-D transpose runs at ~0.5 GB/s. So ``a.T`` is built
    in two tiled steps ([N/bn, bn, M/bm, bm] -> [M/bm, N/bn, bm, bn] -> [M/bm, bm, N/bn, bn] = [M, N]), on the
    uint16 bits (XLA:CPU computes bf16 data movement in float32): each step moves whole tiles, 20x faster than the
    2-D transpose, and the dot sees a row-major [M, N] operand. N is zero-padded to a multiple of 8 when needed
    (zero rows add nothing). Other backends get ``a.T`` (their GEMMs take any layout)."""
    if not _cpu_single_device() or a.dtype.itemsize != 2 or a.shape[1] % 8:
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if a.shape[0] % 8:
        pad = 8 - a.shape[0] % 8
        a = jnp.pad(a, ((0, pad), (0, 0)))
        b = jnp.pad(b, ((0, pad), (0, 0)))
    return jnp.dot(_transpose_tiled(a), b, preferred_element_type=jnp.float32)


def _weight_grad(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` (a [N, M], b [N, K]) as ``_tn_dot``, but tiled-transposing the narrower operand: when K < M,
    ``(b.T @ a).T``, whose transposes move b [N, K] and the [K, M] result instead of a [N, M].

    The tied LM head (a = g [N, V], b = x [N, D]): 0.42 s against 0.56 s for SmolLM2's at 16 x 256 tokens. The MLP's
    down projection (a = the SwiGLU output [N, F], b = g [N, D]): besides moving less, the SwiGLU output, which remat
    recomputes, is no longer fused into a transposing copy, where XLA:CPU evaluated it in strided order (8 ms per
    SmolLM2 layer with a bf16 silu, 61 ms with the float32 one; this way ~2 ms)."""
    if b.shape[1] < a.shape[1] and _tiles_ok(*a.shape, b.shape[1]):
        return _transpose_tiled(_tn_dot(b, a))
    return _tn_dot(a, b)


def _transpose_tiled(a: jax.Array) -> jax.Array:
    """``a.T`` of a 2-D array with both dims multiples of 8, in two tiled steps on the raw bits (see ``_tn_dot``)."""
    N, M = a.shape
    bn, bm = _tile(N), _tile(M)
    utype = {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type
    u = bits(a, utype).reshape(N // bn, bn, M // bm, bm).transpose(2, 0, 3, 1)
    return bits(u.transpose(0, 2, 1, 3).reshape(M, N), a.dtype)


_ACCELERATOR_PATHS = [False]


@contextlib.contextmanager
def accelerator_paths():
    """Within this context, programs traced on XLA:CPU take the paths of the accelerator backends (no CPU-only
    tiling: ``_cpu_single_device`` is False). ``softgrpo plan`` compiles under it, so a one-device plan on a CPU
    host reports the memory of the accelerator's program, not of the CPU's blocked and tiled one."""
    old, _ACCELERATOR_PATHS[0] = _ACCELERATOR_PATHS[0], True
    try:
        yield
    finally:
        _ACCELERATOR_PATHS[0] = old


def _cpu_single_device() -> bool:
    """XLA:CPU without a multi-device activation mesh: the tiled transposes would break GSPMD's batch sharding
    (``tests/test_plan.py`` caught the update's temporaries doubling under fsdp), so sharded runs use plain dots.
    False inside ``accelerator_paths``."""
    mesh = current_activation_mesh()
    return jax.default_backend() == "cpu" and (mesh is None or mesh.size == 1) and not _ACCELERATOR_PATHS[0]


def _tiles_ok(*dims: int) -> bool:
    return _cpu_single_device() and all(d % 8 == 0 for d in dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul16(x, w, transpose_w):
    return _mm(x, w.astype(x.dtype), transpose_w)


def _matmul16_fwd(x, w, transpose_w):
    return _mm(x, w.astype(x.dtype), transpose_w), (x, w)


def _matmul16_bwd(transpose_w, res, g):
    x, w = res
    g = g.astype(x.dtype)  # [N, F]
    dx = _mm(g, w.astype(x.dtype), not transpose_w).astype(x.dtype)  # g @ w.T (or g @ w)
    dw = _weight_grad(g, x) if transpose_w else _weight_grad(x, g)  # [F, D] = g.T @ x, or [D, F] = x.T @ g
    return dx, dw.astype(w.dtype)


_matmul16.defvjp(_matmul16_fwd, _matmul16_bwd)


def _update_slots(buf: jax.Array, upd: jax.Array, index) -> jax.Array:
    """``dynamic_update_slice`` of one layer's cache that stays in place for 16-bit floats: XLA:CPU computes bf16 /
    f16 ops in f32, which turns a bf16 update into convert -> update -> convert of the whole cache every step; the
    same bits as uint16 are updated in place (a bitcast on every backend). Only for per-layer caches: on the
    layer-stacked cache carried by a scan, the bitcast costs a copy of the whole stack instead (measured with
    ``softgrpo plan``), so that path uses a plain update."""
    if buf.dtype.itemsize == 2 and jnp.issubdtype(buf.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type
        out = jax.lax.dynamic_update_slice(bits(buf, jnp.uint16), bits(upd, jnp.uint16), index)
        return bits(out, buf.dtype)
    return jax.lax.dynamic_update_slice(buf, upd, index)


# jax.nn.dot_product_attention's implementation for attention="cudnn"; the tests run the same path on CPU with "xla"
_DPA_IMPLEMENTATION = "cudnn"


def resolve_attention(cfg: ModelConfig) -> str:
    """``cfg.attention`` -> "xla" or "cudnn". auto: cuDNN flash attention for bf16 / f16 compute on an NVIDIA GPU
    with a head dim cuDNN takes (a multiple of 8, at most 128), else the XLA path."""
    if cfg.attention != "auto":
        return cfg.attention
    if cfg.jnp_dtype not in (jnp.bfloat16, jnp.float16) or cfg.head_dim % 8 or cfg.head_dim > 128:
        return "xla"
    try:
        dev = jax.devices()[0]
        cuda = dev.platform == "gpu" and "cuda" in dev.client.platform_version.lower()
    except Exception:  # noqa: BLE001 - no backend details: stay on the portable path
        cuda = False
    return "cudnn" if cuda else "xla"


def _attention_dpa(q, k, v, seqlen, scale):
    """Causal attention through ``jax.nn.dot_product_attention`` for rows whose real tokens come first
    (``seqlen`` [B] of them, None: all). q [B, T, H, hd], k / v [B, T, Hkv, hd] -> [B, T, H, hd]; rows past a
    row's length are zeroed (cuDNN leaves them undefined, and they must not reach a weight gradient)."""
    o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=seqlen,
                                     key_value_seq_lengths=seqlen, implementation=_DPA_IMPLEMENTATION)
    if seqlen is not None:
        valid = jnp.arange(q.shape[1])[None, :] < seqlen[:, None]
        o = jnp.where(valid[:, :, None, None], o, jnp.zeros((), o.dtype))
    return o


def _attention_probs_out(qg, kt, vt, mask, scale):
    """GQA attention as batched GEMMs. qg [B, Hkv, G*T, hd] (query head k*G + g of position t at row g*T + t),
    kt / vt [B, Hkv, S, hd], mask [B, T, S] -> (the softmax weights in the compute dtype [B, Hkv, G*T, S], the
    float32 output [B, Hkv, G*T, hd]). The scale is applied to the queries ([.., hd], not the [.., S] scores)."""
    return _attention_probs_lse(qg, kt, vt, mask, scale)[:2]


def _attention_probs_lse(qg, kt, vt, mask, scale):
    """``_attention_probs_out`` and each query row's log-sum-exp of its scaled scores (float32 [B, Hkv, G*T]; +inf
    for a row with no visible key, so that weights recomputed as exp(s - lse) are 0 there)."""
    B, Hkv, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    s = jnp.einsum("bkqh,bksh->bkqs", qg * jnp.asarray(scale, qg.dtype), kt, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None, :, :], s.reshape(B, Hkv, GT // T, T, S), NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    w = (e / total).astype(qg.dtype).reshape(B, Hkv, GT, S)
    lse = jnp.where(m > NEG_INF / 2, m + jnp.log(total), jnp.inf).reshape(B, Hkv, GT)
    return w, jnp.einsum("bkqs,bksh->bkqh", w, vt, preferred_element_type=jnp.float32), lse


def _group_queries(x: jax.Array, Hkv: int) -> jax.Array:
    """Queries [B, T, H, hd] -> [B, Hkv, G*T, hd], query head k*G + g of position t at row g*T + t (GQA as batched
    GEMMs with one contracting dim each: query head k*G + g uses KV head k)."""
    B, T, H, hd = x.shape
    return x.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, H * T // Hkv, hd)


def _ungroup_queries(x: jax.Array, T: int) -> jax.Array:
    """The inverse of ``_group_queries``: [B, Hkv, G*T, hd] -> [B, T, H, hd]."""
    B, Hkv, GT, hd = x.shape
    return x.reshape(B, Hkv, GT // T, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * GT // T, hd)


def _heads_major(x: jax.Array) -> jax.Array:
    """[B, T, N, hd] -> [B, N, T, hd] as a real copy: with T split first, XLA cannot fold the transpose into the
    consuming dot's dimension numbers, where XLA:CPU would find a batched dot it does not run in bf16 and convert
    the dot to float32 (measured: every attention dot of the update)."""
    B, T, N, hd = x.shape
    s = math.gcd(T, 8)
    return x.reshape(B, T // s, s, N, hd).transpose(0, 3, 1, 2, 4).reshape(B, N, T, hd)


def _swap_last2(x: jax.Array) -> jax.Array:
    """[..., M, N] -> [..., N, M] as a real copy (``_heads_major`` on a [prod(...), M, N, 1] view)."""
    *lead, M, N = x.shape
    return _heads_major(x.reshape(-1, M, N, 1)).reshape(*lead, N, M)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_core(qg, kt, vt, mask, scale, mark=False, causal=False):
    """``_attention_probs_out``'s output in the compute dtype, with the backward written out flash-style: the
    softmax gradient takes its row term from delta = rowsum(dO * O) ([.., G*T, hd]) instead of autodiff's
    rowsum(dW * W) over the [.., G*T, S] weights (on XLA:CPU that reduction alone was 0.95 s of a 12 s
    SmolLM2 update), the scale is applied to [.., hd] arrays only, and every GEMM takes compute-dtype operands
    with float32 accumulation, in layouts XLA:CPU runs as bf16 GEMMs (the key / value gradients as
    dK^T = Q^T dS and dV^T = dO^T W: no GEMM contracts the rows of both operands). ``mark``: name the residuals
    for ``forward``'s checkpoint policy (``_RESIDUAL``). ``causal``: the mask is causal in slot order (S == T)
    at least; on XLA:CPU the work is then tiled (see ``_attention_tiles``)."""
    return _attention_core_fwd(qg, kt, vt, mask, scale, mark, causal)[0]


def _attention_tiles(B: int, T: int, S: int, row_bytes: int, causal: bool) -> tuple[int, int]:
    """(batch rows per tile, query positions per tile) for ``_attention_core``. On XLA:CPU the attention is
    bound by moving its [.., G*T, S] scores and weights through memory (~10 passes); a loop over tiles of a few
    batch rows keeps each tile's arrays in cache, and with a causal mask each query tile only touches the keys up
    to its end (positions tiled by 64: 5/8 of the score elements at T = 256). One SmolLM2 layer's attention
    forward + backward (16 x 256 tokens): 74 -> 54 ms (benchmarks/bench_cpu_attention.py). Elsewhere, and under
    a multi-device mesh (a loop over batch rows would fight GSPMD's batch sharding): one tile. A query row with no
    visible key (left padding) then averages the values of its tile's keys instead of all S: such rows never
    reach a real position's output, and no cotangent reaches them."""
    if not _cpu_single_device():
        return B, T
    tq = 64 if causal and S == T and T % 64 == 0 and T >= 128 else T
    bb = 1
    for d in range(1, B + 1):  # the most batch rows whose float32 scores stay within ~8 MB
        if B % d == 0 and d * row_bytes <= 8 << 20:
            bb = d
    return bb, tq


def _map_rows(fn, bb, *xs):
    """``fn`` over tiles of ``bb`` batch rows of the arrays (pytrees) ``xs`` (``lax.map``; 16-bit floats cross the
    loop as uint16 bits: XLA:CPU computes a bf16 dynamic-slice / -update-slice in float32, converting whole
    arrays), results merged back. One tile: ``fn(*xs)``."""
    B = jax.tree.leaves(xs)[0].shape[0]
    if bb >= B:
        return fn(*xs)

    def body(args):
        return jax.tree.map(_to_bits, fn(*jax.tree.map(_from_bits, args, tiles)))

    tiles = jax.tree.map(lambda x: jax.ShapeDtypeStruct((bb,) + x.shape[1:], x.dtype), xs)
    out = jax.lax.map(body, jax.tree.map(lambda x: _to_bits(x).reshape((B // bb, bb) + x.shape[1:]), xs))
    return jax.tree.map(lambda a, ref: _from_bits(a.reshape((B,) + a.shape[2:]), ref), out, jax.eval_shape(fn, *tiles))


def _to_bits(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _from_bits(a, ref):
    return jax.lax.bitcast_convert_type(a, ref.dtype) if a.dtype != ref.dtype else a  # ref: the original dtype


def _query_tile(x, j, tq, T):
    """Rows of query positions [j*tq, (j+1)*tq) of a [b, Hkv, G*T, ...] array (row g*T + t)."""
    b, k, GT = x.shape[:3]
    x5 = x.reshape((b, k, GT // T, T) + x.shape[3:])[:, :, :, j * tq:(j + 1) * tq]
    return x5.reshape((b, k, (GT // T) * tq) + x.shape[3:])


def _attention_fwd_tile(qg, kt, vt, mask, scale, tq):
    """One batch tile's attention: (float32 output [b, Hkv, G*T, hd], the weights per query tile)."""
    T = mask.shape[1]
    if tq >= T:
        w, o = _attention_probs_out(qg, kt, vt, mask, scale)
        return o, (w,)
    b, k, GT, hd = qg.shape
    outs, ws = [], []
    for j in range(T // tq):
        end = (j + 1) * tq  # causal: the keys up to this tile's last query
        w, o = _attention_probs_out(_query_tile(qg, j, tq, T), kt[:, :, :end], vt[:, :, :end],
                                    mask[:, j * tq:end, :end], scale)
        outs.append(o.reshape(b, k, GT // T, tq, hd))
        ws.append(w)
    return jnp.concatenate(outs, axis=3).reshape(b, k, GT, hd), tuple(ws)


def _attention_bwd_tile(qg, kt, vt, ws, o, do, scale, T, tq):
    """One batch tile's (dQ, dK, dV) from the forward's weights ``ws`` (per query tile) and float32 output."""
    do = do.astype(qg.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1, keepdims=True)  # rowsum(dW * W) = dO . O
    dq, dkt, dvt = _attention_grads(qg, kt, vt, lambda j: ws[j], delta, do, scale, T, tq)
    return dq.astype(qg.dtype), _swap_last2(dkt).astype(kt.dtype), _swap_last2(dvt).astype(vt.dtype)


def _attention_grads(qg, kt, vt, weights, delta, do, scale, T, tq):
    """float32 (dQ [b, Hkv, G*T, hd], dK^T and dV^T [b, Hkv, hd, S]) of one batch tile, query tile by query tile
    (``tq``; causal: tile j sees the keys up to its end), from ``weights(j)`` (tile j's softmax weights in the
    compute dtype), delta = rowsum(dO * O) [b, Hkv, G*T, 1] and dO in the compute dtype."""
    f32, dt = jnp.float32, qg.dtype

    def grads(q, do_, delta_, w, k, v):
        dw = jnp.einsum("bkqh,bksh->bkqs", do_, v, preferred_element_type=f32)
        ds = (w.astype(f32) * (dw - delta_)).astype(dt)  # dS / scale
        dq = jnp.einsum("bkqs,bksh->bkqh", ds, k, preferred_element_type=f32) * scale
        dkt = jnp.einsum("bkhq,bkqs->bkhs", _swap_last2(q), ds, preferred_element_type=f32) * scale
        dvt = jnp.einsum("bkhq,bkqs->bkhs", _swap_last2(do_), w, preferred_element_type=f32)
        return dq, dkt, dvt

    if tq >= T:
        return grads(qg, do, delta, weights(0), kt, vt)
    b, k, GT, hd = qg.shape
    S = kt.shape[2]
    dqs, dkt, dvt = [], jnp.zeros((b, k, hd, S), f32), jnp.zeros((b, k, hd, S), f32)
    for j in range(T // tq):
        end = (j + 1) * tq
        dq_j, dk_j, dv_j = grads(*(_query_tile(a, j, tq, T) for a in (qg, do, delta)), weights(j),
                                 kt[:, :, :end], vt[:, :, :end])
        dqs.append(dq_j.reshape(b, k, GT // T, tq, hd))
        dkt = dkt.at[..., :end].add(dk_j)
        dvt = dvt.at[..., :end].add(dv_j)
    return jnp.concatenate(dqs, axis=3).reshape(b, k, GT, hd), dkt, dvt


def _attention_core_fwd(qg, kt, vt, mask, scale, mark, causal):
    B, k, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    bb, tq = _attention_tiles(B, T, S, k * GT * S * 4, causal)
    o, ws = _map_rows(lambda q, kk, v, m: _attention_fwd_tile(q, kk, v, m, scale, tq), bb, qg, kt, vt, mask)
    ws, o = jax.lax.optimization_barrier((ws, o))  # keep them: XLA would otherwise recompute O inside the backward
    res = (qg, kt, vt, ws, o)
    if mark:
        res = jax.tree.map(_named_residual, res)
    return o.astype(qg.dtype), res[:3] + (mask,) + res[3:]


def _attention_core_bwd(scale, mark, causal, res, do):
    qg, kt, vt, mask, ws, o = res
    B, k, GT, _ = qg.shape
    T, S = mask.shape[1], kt.shape[2]
    bb, tq = _attention_tiles(B, T, S, k * GT * S * 4, causal)
    dq, dk, dv = _map_rows(lambda q, kk, v, w, o_, d: _attention_bwd_tile(q, kk, v, w, o_, d, scale, T, tq), bb,
                           qg, kt, vt, ws, o, do)
    return dq, dk, dv, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ``_attention_block`` for the whole-sequence attention on single-device XLA:CPU in 16 bits; False: the plain path
# (``_dense`` projections, ``apply_rope``, ``_attention_core``).
ATTENTION_BLOCK = True


def _attention_block_on(h: jax.Array) -> bool:
    """Whether a layer runs its whole-sequence attention as ``_attention_block``: 16-bit compute on single-device
    XLA:CPU (elsewhere the compilers fuse the plain path well, and a loop over batch tiles would fight GSPMD's batch
    sharding)."""
    return (ATTENTION_BLOCK and h.dtype.itemsize == 2 and jnp.issubdtype(h.dtype, jnp.floating)
            and _cpu_single_device())


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _attention_block(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static):
    """A layer's causal self-attention from its normed input h [B, T, D] (16-bit) to the attention output
    [B, T, H*hd] before the output projection: query / key / value projections (biases optional, None), RoPE
    (``cos`` / ``sin`` [B, T, hd]), GQA attention under ``mask`` [B, T, T] (causal in slot order), over tiles of
    batch rows as ``_attention_core`` tiles them (``_attention_tiles``). ``static`` = (H, Hkv, hd, scale, mark);
    ``mark`` names the saved output and statistics for ``forward``'s checkpoint policies (``_ATTENTION_SAVED``).

    The forward is the plain path's arithmetic with its roundings (each projection rounded to h's dtype, RoPE in
    float32 rounded once, ``_attention_probs_out``; the three projections run as one GEMM, whose float32 sums may
    come in another order), tile by tile, and it saves only h, the output (16-bit) and each query row's log-sum-exp
    (float32). The backward
    recomputes a tile's queries, keys and values from h and its softmax weights as exp(s - lse), as flash attention
    does: under remat the recomputed layer forward then skips the attention altogether (the output is saved), and
    without remat the residuals shrink from the weights [B, H, T, T] to [B, H, T]. Per tile it takes delta =
    rowsum(dO * O) from the saved 16-bit output (the forward-only path uses the float32 one), runs
    ``_attention_grads``, the RoPE transpose in float32, and h's gradient as one float32 sum of the three projections'
    terms rounded once (autodiff rounds each and adds in 16 bits); the weight and bias gradients accumulate over the
    tiles in float32 and are returned in each parameter's dtype. A query row with no visible key (left padding)
    outputs the mean of its tile's values, as ``_attention_core`` does, and passes no gradient."""
    return _attention_block_fwd(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static)[0]


def _block_tiles(h, static, S):
    H, T = static[0], h.shape[1]
    return _attention_tiles(h.shape[0], T, S, H * T * S * 4, True)


def _block_params(wq, wk, wv, bq, bk, bv, dt):
    """The three projections as one [D, (H + 2 Hkv) hd] weight in ``dt`` (one GEMM per tile instead of three) and
    one float32 bias (None without biases)."""
    w = jnp.concatenate([x.astype(dt) for x in (wq, wk, wv)], axis=1)
    if bq is None and bk is None and bv is None:
        return w, None
    return w, jnp.concatenate([jnp.zeros(x.shape[1], jnp.float32) if y is None else y.astype(jnp.float32)
                               for x, y in ((wq, bq), (wk, bk), (wv, bv))])


def _block_qkv(ht, ct, st, w, b, static):
    """One batch tile's queries [b, Hkv, G*T, hd] (head k*G + g of position t at row g*T + t), keys and values
    [b, Hkv, T, hd], with the plain path's roundings (``w``, ``b``: ``_block_params``)."""
    H, Hkv, hd = static[:3]
    bt, T, D = ht.shape
    y = _mm(ht.reshape(bt * T, D), w, False)
    if b is not None:
        y = y + b
    y = y.astype(ht.dtype).reshape(bt, T, H + 2 * Hkv, hd)
    k = apply_rope(y[:, :, H:H + Hkv], ct, st)
    return _group_queries(apply_rope(y[:, :, :H], ct, st), Hkv), _heads_major(k), _heads_major(y[:, :, H + Hkv:])


def _block_fwd_tile(ht, ct, st, mt, w, b, static, tq):
    """One batch tile's attention output [b, T, H*hd] (h's dtype) and log-sum-exp [b, Hkv, G*T]."""
    H, Hkv, hd, scale = static[:4]
    G, (bt, T) = H // Hkv, ht.shape[:2]
    qg, kt, vt = _block_qkv(ht, ct, st, w, b, static)
    outs, lses = [], []
    for j in range(T // tq):
        end = (j + 1) * tq  # causal: the keys up to this tile's last query
        _, o, lse = _attention_probs_lse(_query_tile(qg, j, tq, T), kt[:, :, :end], vt[:, :, :end],
                                         mt[:, j * tq:end, :end], scale)
        outs.append(o.astype(ht.dtype).reshape(bt, Hkv, G, tq, hd))
        lses.append(lse.reshape(bt, Hkv, G, tq))
    o = _ungroup_queries(jnp.concatenate(outs, axis=3).reshape(bt, Hkv, G * T, hd), T).reshape(bt, T, H * hd)
    return o, jnp.concatenate(lses, axis=3).reshape(bt, Hkv, G * T)


def _rope_transpose(g: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The transpose of ``apply_rope``'s rotation in float32: g * cos - rotate_half(g * sin) (cos / sin broadcast
    to g)."""
    return g * cos - _rotate_half(g * sin)


def _attention_block_fwd(h, wq, wk, wv, bq, bk, bv, cos, sin, mask, static):
    w, b = _block_params(wq, wk, wv, bq, bk, bv, h.dtype)
    bb, tq = _block_tiles(h, static, mask.shape[2])
    o, lse = _map_rows(lambda ht, ct, st, mt: _block_fwd_tile(ht, ct, st, mt, w, b, static, tq), bb,
                       h, cos, sin, mask)
    if static[4]:
        o, lse = _named_residual(o, _ATTENTION_SAVED), _named_residual(lse, _ATTENTION_SAVED)
    return o, (h, wq, wk, wv, bq, bk, bv, cos, sin, mask, o, lse)


def _attention_block_bwd(static, res, do):
    h, wq, wk, wv, bq, bk, bv, cos, sin, mask, o, lse = res
    H, Hkv, hd, scale = static[:4]
    f32, dt, G = jnp.float32, h.dtype, H // Hkv
    B, T, D = h.shape
    w, b = _block_params(wq, wk, wv, bq, bk, bv, dt)
    bb, tq = _block_tiles(h, static, mask.shape[2])
    refs = (h, cos, sin, mask, o, lse, do.astype(dt))

    def tile(acc, xs):  # one batch tile's dh; its weight and bias gradients added to the float32 accumulators
        ht, ct, st, mt, ot, lt, dot_ = (_from_bits(x, r) for x, r in zip(xs, refs))
        qg, kt, vt = _block_qkv(ht, ct, st, w, b, static)
        dog, og = (_group_queries(a.reshape(bb, T, H, hd), Hkv) for a in (dot_, ot))
        delta = jnp.sum(dog.astype(f32) * og.astype(f32), axis=-1, keepdims=True)
        lt = lt.reshape(bb, Hkv, G, T)

        def weights(j):  # query tile j's softmax weights, recomputed
            end = (j + 1) * tq
            s = jnp.einsum("bkqh,bksh->bkqs", _query_tile(qg, j, tq, T) * jnp.asarray(scale, dt), kt[:, :, :end],
                           preferred_element_type=f32).reshape(bb, Hkv, G, -1, end)
            p = jnp.where(mt[:, None, None, j * tq:end, :end], jnp.exp(s - lt[:, :, :, j * tq:end, None]), 0)
            return p.astype(dt).reshape(bb, Hkv, -1, end)

        dq, dkt, dvt = _attention_grads(qg, kt, vt, weights, delta, dog, scale, T, tq)
        dq = _rope_transpose(_ungroup_queries(dq, T), ct[:, :, None], st[:, :, None])  # [b, T, H, hd]
        dq = dq.astype(dt).reshape(bb * T, H * hd)
        dk = _swap_last2(dkt).transpose(0, 2, 1, 3)  # [b, T, Hkv, hd]
        dk = _rope_transpose(dk, ct[:, :, None], st[:, :, None]).astype(dt).reshape(bb * T, Hkv * hd)
        dv = _swap_last2(dvt).transpose(0, 2, 1, 3).astype(dt).reshape(bb * T, Hkv * hd)
        dy = jnp.concatenate([dq, dk, dv], axis=1)  # [b*T, (H + 2 Hkv) hd]: the gradient of the joint projection
        dh = _mm(dy, w, True).astype(dt)
        acc_w = acc[0] + _tn_dot(ht.reshape(bb * T, D), dy)
        acc_b = None if acc[1] is None else acc[1] + jnp.sum(dy.astype(f32), axis=0)
        return (acc_w, acc_b), _to_bits(dh.reshape(bb, T, D))

    zeros = (jnp.zeros(w.shape, f32), None if b is None else jnp.zeros(b.shape, f32))
    xs = tuple(_to_bits(x).reshape((B // bb, bb) + x.shape[1:]) for x in refs)
    (dw, db), dh = jax.lax.scan(tile, zeros, xs)
    split = [wq.shape[1], wq.shape[1] + wk.shape[1]]
    dws = tuple(g.astype(x.dtype) for g, x in zip(jnp.split(dw, split, axis=1), (wq, wk, wv)))
    dbs = tuple(None if x is None else g.astype(x.dtype)
                for g, x in zip((None,) * 3 if db is None else jnp.split(db, split), (bq, bk, bv)))
    return (_from_bits(dh.reshape(B, T, D), h),) + dws + dbs + (None, None, None)


_attention_block.defvjp(_attention_block_fwd, _attention_block_bwd)


def _make_layer_fn(cfg: ModelConfig, cos, sin, attn_mask, start, local: bool = False, fused: bool = False,
                   seqlen=None, residuals: str | None = None):
    """One decoder layer ``(x, p, i, kv) -> (x, kv)``. ``residuals`` marks the values the backward pass saves for
    ``forward``'s checkpoint policies (see ``_RESIDUAL``): "input" the layer input, "all" every residual, None none
    (the marks force bf16 rounding where XLA could otherwise keep excess precision, so unmarked passes stay as
    they were)."""
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scale = 1.0 / math.sqrt(hd)
    mark_all = residuals == "all"
    keep = saved_residual if mark_all else (lambda a: a)

    def layer(x, p: dict[str, Any], i, kv):
        B, T, _ = x.shape
        x = constrain_batch(x)  # no-op without distributed.activation_sharding
        if residuals:
            x = saved_residual(x, _LAYER_INPUT)
        h = keep(rms_norm(x, p["attn_norm"], cfg.rms_norm_eps))
        if kv is None and not fused and _attention_block_on(h):
            o = _attention_block(h, p["wq"], p["wk"], p["wv"], p.get("bq"), p.get("bk"), p.get("bv"), cos, sin,
                                 attn_mask, (H, Hkv, hd, scale, residuals is not None))
            return _mlp_block(cfg, x, o, p, keep, keep_o=residuals is None), kv
        q = _dense(h, p["wq"], p.get("bq")).reshape(B, T, H, hd)
        k = _dense(h, p["wk"], p.get("bk")).reshape(B, T, Hkv, hd)
        v = _dense(h, p["wv"], p.get("bv")).reshape(B, T, Hkv, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if fused:  # whole sequences, no cache, rows reordered real-tokens-first (see forward)
            o = _attention_dpa(q, k, v, seqlen, scale).reshape(B, T, H * hd)
            return _mlp_block(cfg, x, o, p, keep), kv
        kt = _heads_major(k)  # [B, Hkv, T, hd]: this call's keys / values
        vt = _heads_major(v)
        if kv is not None:
            ck, cv = kv  # [L, B, Hkv, S, hd] with a layer index i, or one layer's [B, Hkv, S, hd] (i None)
            if i is None:
                ck = _update_slots(ck, kt.astype(ck.dtype), (0, 0, start, 0))
                cv = _update_slots(cv, vt.astype(cv.dtype), (0, 0, start, 0))
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
        # the layout [B, Hkv, G*T, hd] keeps every dot (and its gradients) a plain batched GEMM on XLA:CPU and GPU
        qg = _group_queries(q, Hkv)
        if kv is None:  # a whole-sequence pass (log-probs, training): the written-out backward
            o = _attention_core(qg, kt, vt, attn_mask, scale, mark_all, True)
        else:
            o = _attention_probs_out(qg, kt, vt, attn_mask, scale)[1].astype(x.dtype)
        o = _ungroup_queries(o, T).reshape(B, T, H * hd)
        return _mlp_block(cfg, x, o, p, keep), kv

    return layer


def _mlp_block(cfg: ModelConfig, x, o, p, keep=lambda a: a, keep_o: bool = True):
    """The rest of a layer after attention: output projection, residual, MLP, residual (``keep`` marks residuals;
    ``keep_o`` False: ``o`` is saved already)."""
    x = keep(x + _dense(keep(o) if keep_o else o, p["wo"], p.get("bo")))
    h = keep(rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))
    rows = _mlp_tile_rows(h)
    if rows:
        y = _swiglu_mlp(h.reshape(-1, h.shape[-1]), p["w_gate"], p["w_up"], p["w_down"], rows)
        return constrain_batch(x + y.reshape(x.shape))
    g = keep(_dense(h, p["w_gate"]))
    u = keep(_dense(h, p["w_up"]))
    x = x + _dense(keep(swiglu(g, u)), p["w_down"])
    return constrain_batch(x)


# Rows (tokens) per tile of ``_swiglu_mlp``; 0 turns it off (the plain path: three ``_dense`` and ``swiglu``).
MLP_TILE_ROWS = 512


def _mlp_tile_rows(h: jax.Array) -> int:
    """Rows per tile for ``_swiglu_mlp`` on this input, or 0 for the plain path: only for 16-bit compute on
    single-device XLA:CPU (elsewhere the compilers fuse the plain path well, and a loop over token tiles would
    fight GSPMD's batch sharding). The tile is the largest multiple of 8 up to ``MLP_TILE_ROWS`` dividing the
    token count, and at least 64 (or ``MLP_TILE_ROWS`` if smaller); otherwise, or with fewer tokens than a tile,
    one tile."""
    N = math.prod(h.shape[:-1])
    if not MLP_TILE_ROWS or h.dtype.itemsize != 2 or not _cpu_single_device():
        return 0
    if N <= MLP_TILE_ROWS:
        return N
    for r in range(MLP_TILE_ROWS - MLP_TILE_ROWS % 8, min(64, MLP_TILE_ROWS) - 1, -8):
        if N % r == 0:
            return r
    return N


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_mlp(h, wg, wu, wd, rows):
    """The SwiGLU MLP ``(silu(h Wg) * (h Wu)) Wd`` for h [N, D] in a 16-bit compute dtype and weights of any dtype
    (cast to h's), over tiles of ``rows`` tokens, with the same roundings as the plain path (each GEMM's float32
    result rounded to h's dtype, ``swiglu`` rounded once).

    Why tiles (XLA:CPU): the gate and up GEMMs write float32 [N, F] results that the SwiGLU then reads back; at
    SmolLM2's training shape (16 x 256 tokens) those are 25 MB each. Over tiles of 512 tokens the float32
    intermediates stay in cache: a 30-layer rematerialised MLP stack's forward + backward 3.7-4.1 -> 2.9-3.1 s (1.19-1.39x)
    (``benchmarks/bench_cpu_update_ab.py --mlp``), the SmolLM2 update 1.08x faster. The backward recomputes each tile's gate and up GEMMs from h (the only activation
    saved, as flash attention does with its scores), so under remat the layer's recomputed forward skips the MLP
    altogether, and without remat the saved residuals shrink from four [N, F]-sized arrays to one [N, D]. The
    weight gradients are accumulated over the tiles in float32 (in cache too: 1.35 -> ~0.6 s of GEMMs in the
    SmolLM2 update against whole-N weight-gradient GEMMs) and returned in each weight's dtype. h's gradient sums
    the gate and up terms in float32 and rounds once (the plain path rounds each, then adds in bf16)."""
    return _swiglu_mlp_fwd(h, wg, wu, wd, rows)[0]


def _gate_up(h, wg, wu):
    """One tile's gate and up projections, each rounded to h's dtype (weights already cast)."""
    return _mm(h, wg, False).astype(h.dtype), _mm(h, wu, False).astype(h.dtype)


def _swiglu_mlp_fwd(h, wg, wu, wd, rows):
    wgc, wuc, wdc = (w.astype(h.dtype) for w in (wg, wu, wd))
    y = _map_rows(lambda ht: _mm(swiglu(*_gate_up(ht, wgc, wuc)), wdc, False).astype(h.dtype), rows, h)
    return y, (h, wg, wu, wd)


def _swiglu_mlp_bwd(rows, res, dy):
    h, wg, wu, wd = res
    dt, bits = h.dtype, jax.lax.bitcast_convert_type
    wgc, wuc, wdc = (w.astype(dt) for w in (wg, wu, wd))
    N, D = h.shape

    def tile(acc, xs):  # one tile's dh, its weight gradients added to the float32 accumulators
        ht, dyt = (bits(x, dt) for x in xs)
        g, u = _gate_up(ht, wgc, wuc)
        da = _mm(dyt, wdc, True).astype(dt)  # dy @ Wd.T
        dg, du = _swiglu_bwd((g, u), da)
        dh = (_mm(dg, wgc, True) + _mm(du, wuc, True)).astype(dt)
        acc = (acc[0] + _tn_dot(ht, dg), acc[1] + _tn_dot(ht, du), acc[2] + _tn_dot(dyt, swiglu(g, u)))
        return acc, bits(dh, jnp.uint16)

    # tiles cross the loop as uint16 bits (see _map_rows); Wd's gradient is accumulated as [D, F] (the narrower
    # operand is the one transposed, as in _weight_grad) and transposed once
    acc = tuple(jnp.zeros((D, wg.shape[1]), jnp.float32) for _ in range(3))
    xs = tuple(bits(x, jnp.uint16).reshape(N // rows, rows, D) for x in (h, dy.astype(dt)))
    (dwg, dwu, dwd), dh = jax.lax.scan(tile, acc, xs)
    dwd = _transpose_tiled(dwd) if _tiles_ok(*dwd.shape) else dwd.T
    return bits(dh.reshape(N, D), dt), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)


_swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
    """``silu(g) * u``, computed in float32 and rounded once to g's dtype; the backward likewise.

    Written out because XLA:CPU has no bf16 arithmetic: ``jax.nn.silu(g) * u`` on bf16 arrays rounds after each of
    its five ops (negate, exp, add, divide, multiply), a chain of conversions that made this elementwise fusion
    ~9 ms per SmolLM2 layer at 16 x 256 tokens, and autodiff's backward another such chain. torch autocast rounds
    twice (silu, then the product); this rounds once."""
    gf = g.astype(jnp.float32)
    return (gf / (1.0 + jnp.exp(-gf)) * u.astype(jnp.float32)).astype(g.dtype)


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dy):
    g, u = res
    gf, uf, d = g.astype(jnp.float32), u.astype(jnp.float32), dy.astype(jnp.float32)
    s = 1.0 / (1.0 + jnp.exp(-gf))
    du = d * gf * s
    dg = d * uf * s * (1.0 + gf * (1.0 - s))  # d silu / dg = s (1 + g (1 - s))
    return dg.astype(g.dtype), du.astype(u.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
