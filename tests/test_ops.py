"""The model's kernels (softgrpo_jax.ops) against float64 NumPy and against their plain paths: the mixed-precision
matmul, the SwiGLU and tiled MLP, the attention core and the fused attention block, the vocabulary-chunked
log-probs' memory, the remat policies; and the tuning knobs that switch them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softgrpo_jax.ops import mlp
from softgrpo_jax.ops.attention import attention_core, attention_tiles
from softgrpo_jax.ops.attention_block import attention_block, attention_block_on
from softgrpo_jax.ops.matmul import dense
from softgrpo_jax.ops.tuning import Tuning, set_tuning, tuning, use_tuning


def _ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


# ------------------------------------------------------------------------------------ bf16 training gradients
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("n,d,f", [(24, 48, 80), (13, 40, 96), (16, 12, 20), (32, 96, 40)])
def test_bf16_matmul_gradients(n, d, f, transpose_w):
    """The mixed-precision matmul's hand-written backward against float64 NumPy: the weight gradient from bf16
    operands with float32 accumulation (unrounded, in the weight's float32), the input gradient in bf16. Token
    counts that are not multiples of 8 (padded), widths too narrow for tiles (the plain path) and an output
    narrower than the input (the weight gradient as (g.T @ x).T) included."""
    from softgrpo_jax.ops.matmul import matmul

    rng = np.random.RandomState(n + d + f)
    x = jnp.asarray(rng.randn(n, d), jnp.bfloat16)
    w = jnp.asarray(rng.randn(*((f, d) if transpose_w else (d, f))), jnp.float32)
    c = jnp.asarray(rng.randn(n, f), jnp.float32)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w, transpose_w) * c), argnums=(0, 1)))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    c64 = np.asarray(c.astype(jnp.bfloat16), np.float64)  # the cotangent is cast to bf16, as autocast does
    ref_w = c64.T @ x64 if transpose_w else x64.T @ c64
    ref_x = c64 @ w64 if transpose_w else c64 @ w64.T
    np.testing.assert_allclose(np.asarray(gw), ref_w, rtol=0, atol=1e-4 * np.abs(ref_w).max())
    np.testing.assert_allclose(np.asarray(gx, np.float64), ref_x, rtol=0, atol=1e-2 * np.abs(ref_x).max())
    y = jax.jit(lambda x, w: matmul(x, w, transpose_w))(x, w)
    np.testing.assert_allclose(np.asarray(y), x64 @ (w64.T if transpose_w else w64), rtol=0,
                               atol=1e-4 * np.abs(np.asarray(y)).max())


def test_vocab_logprobs_bf16_and_memory():
    """bf16 compute: the chunked path agrees with the full bf16 logits within bf16 rounding; and the compiled
    log-prob pass holds [rows, V] float32 logits at a time (and on XLA:CPU their exponentials), not [N, V]."""
    from softgrpo_jax.models import ModelConfig
    from softgrpo_jax.models.transformer import logits_from_hidden, vocab_logprobs

    cfg = ModelConfig(family="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, dtype="bfloat16")
    rng = np.random.RandomState(0)
    params = {"embed": jnp.asarray(rng.randn(4096, 64) * 0.5, jnp.float32)}
    h = jnp.asarray(rng.randn(8, 64, 64), jnp.bfloat16)
    tgt = jnp.asarray(rng.randint(0, 4096, (8, 64)))
    need = jnp.asarray(rng.rand(8, 64) < 0.5)
    want = jnp.where(need, jnp.take_along_axis(jax.nn.log_softmax(logits_from_hidden(cfg, params, h)),
                                               tgt[..., None], -1)[..., 0], 0.0)
    f = jax.jit(lambda p, h: vocab_logprobs(cfg, p, h, tgt, need, chunk_size=64))
    np.testing.assert_allclose(np.asarray(f(params, h)), np.asarray(want), rtol=0, atol=2e-2)
    g = jax.jit(jax.grad(lambda p: jnp.sum(vocab_logprobs(cfg, p, h, tgt, need, chunk_size=64))))(params)["embed"]
    gw = jax.grad(lambda p: jnp.sum(jnp.where(need, jnp.take_along_axis(
        jax.nn.log_softmax(logits_from_hidden(cfg, p, h)), tgt[..., None], -1)[..., 0], 0.0)))(params)["embed"]
    assert np.abs(np.asarray(g) - np.asarray(gw)).max() <= 2e-2 * np.abs(np.asarray(gw)).max()
    logits_bytes = 8 * 64 * 4096 * 4
    temp = f.lower(params, h).compile().memory_analysis().temp_size_in_bytes
    assert temp < logits_bytes / 2, (temp, logits_bytes)  # chunks of 64 of the 512 rows: two chunk buffers


def test_swiglu_against_numpy():
    """silu(g) * u rounded once, and its written-out backward, against float64 NumPy (bf16 and float32)."""
    from softgrpo_jax.ops.mlp import swiglu

    rng = np.random.RandomState(1)
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        g = jnp.asarray(rng.randn(64, 48) * 3, dt)
        u = jnp.asarray(rng.randn(64, 48), dt)
        c = jnp.asarray(rng.randn(64, 48), dt)
        y, (dg, du) = jax.jit(lambda g, u: (swiglu(g, u), jax.grad(lambda g, u: jnp.sum(
            (swiglu(g, u) * c).astype(jnp.float32)), argnums=(0, 1))(g, u)))(g, u)
        assert y.dtype == dt and dg.dtype == dt and du.dtype == dt
        g64, u64, c64 = (np.asarray(a, np.float64) for a in (g, u, c))
        s = 1 / (1 + np.exp(-g64))
        for got, ref in ((y, g64 * s * u64), (du, c64 * g64 * s), (dg, c64 * u64 * s * (1 + g64 * (1 - s)))):
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("n,rows", [(96, 32), (40, 40), (64, 8)])
def test_tiled_swiglu_mlp_against_numpy(n, rows):
    """``swiglu_mlp`` (the MLP over token tiles, backward recomputing gate and up per tile, weight gradients
    accumulated over tiles) against float64 NumPy (value and all four gradients, within bf16 rounding), and against
    the plain path (three ``dense`` and ``swiglu``): the same value and weight gradients to float32 summation order,
    h's gradient within one bf16 rounding; random inputs, several tiles and one."""
    rng = np.random.RandomState(n)
    D, F = 24, 40
    h = jnp.asarray(rng.randn(n, D), jnp.bfloat16)
    wg, wu, wd = (jnp.asarray(rng.randn(*s) * 0.3, jnp.float32) for s in ((D, F), (D, F), (F, D)))
    c = jnp.asarray(rng.randn(n, D), jnp.bfloat16)

    def run(f):
        y, vjp = jax.vjp(f, h, wg, wu, wd)
        return (y,) + vjp(c)

    tiled = jax.jit(lambda *a: run(lambda *x: mlp.swiglu_mlp(*x, rows)))()
    plain = jax.jit(lambda: run(lambda h, wg, wu, wd: dense(mlp.swiglu(dense(h, wg), dense(h, wu)), wd)))()
    assert [a.dtype for a in tiled] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32]

    h64, wg64, wu64, wd64, c64 = (np.asarray(a, np.float64) for a in (h, wg, wu, wd, c))
    g, u = h64 @ wg64, h64 @ wu64
    s = 1 / (1 + np.exp(-g))
    a = g * s * u
    da = c64 @ wd64.T
    dg, du = da * u * s * (1 + g * (1 - s)), da * g * s
    ref = (a @ wd64, dg @ wg64.T + du @ wu64.T, h64.T @ dg, h64.T @ du, a.T @ c64)
    for name, got, want in zip(("y", "dh", "dwg", "dwu", "dwd"), tiled, ref):
        got = np.asarray(got, np.float64)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 2e-2, (name, rel)
        assert np.abs(want).max() > 0.1, name
    np.testing.assert_array_equal(np.asarray(tiled[0], np.float32), np.asarray(plain[0], np.float32))
    for name, got, want in zip(("dwg", "dwu", "dwd"), tiled[2:], plain[2:]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)
    dh_t, dh_p = np.asarray(tiled[1], np.float64), np.asarray(plain[1], np.float64)
    assert np.abs(dh_t - dh_p).max() <= 2 ** -7 * np.abs(dh_p).max(), np.abs(dh_t - dh_p).max()


def test_mlp_tile_rows():
    """Which token tiles the tiled MLP takes: bf16 on single-device XLA:CPU only, the largest multiple of 8 up to
    ``Tuning.mlp_tile_rows`` dividing the token count, one tile for few tokens or no such divisor, off at 0."""
    def rows(n, dt=jnp.bfloat16):
        return mlp.mlp_tile_rows(jnp.zeros((1, n, 8), dt))

    assert tuning().mlp_tile_rows == Tuning().mlp_tile_rows == 512
    assert (rows(4096), rows(3072), rows(1000), rows(300), rows(4100), rows(4096, jnp.float32)) == (
        512, 512, 200, 300, 4100, 0)
    with use_tuning(mlp_tile_rows=0):
        assert rows(4096) == 0
    assert rows(4096) == 512


@pytest.mark.parametrize("remat", [False, True])
def test_tiled_mlp_model_gradients(remat):
    """A bf16 model on XLA:CPU with the MLP forced into several token tiles per layer (``Tuning.mlp_tile_rows`` = 8 over
    2 x 16 tokens) against the plain MLP path: the same logits, parameter gradients within bf16 rounding."""
    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", remat=remat)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(6)))
    ids = jnp.asarray(_ids(64, (2, 16), seed=8))

    def run():
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids)
            return jax.nn.log_softmax(logits, -1)[..., 5].sum(), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    set_tuning(mlp_tile_rows=8)
    assert mlp.mlp_tile_rows(jnp.zeros((2, 16, 32), jnp.bfloat16)) == 8
    (_, logits_t), g_t = run()
    set_tuning(mlp_tile_rows=0)
    (_, logits_p), g_p = run()
    np.testing.assert_array_equal(np.asarray(logits_t), np.asarray(logits_p))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_t), jax.tree.leaves(g_p)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(b).max() > 0, path
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 2e-2, (jax.tree_util.keystr(path), rel)


def _dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every dot's operands in a compiled HLO module."""
    import re

    types = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
    return [tuple(types[o] for o in re.findall(r"%([\w.\-]+)", m.group(1))[:2])
            for m in re.finditer(r" dot\(([^)]*)\)", hlo)]


def test_bf16_weight_gradient_gemms_stay_bf16():
    """On XLA:CPU the weight gradient x.T @ g must reach the GEMM as bf16 operands (plain autodiff hands it a
    float32 cotangent, and XLA:CPU converts a bf16 dot contracting both operands' leading dim to float32)."""
    from softgrpo_jax.ops.matmul import matmul

    x = jnp.ones((256, 64), jnp.bfloat16)
    for transpose_w in (False, True):
        w = jnp.ones((128, 64) if transpose_w else (64, 128), jnp.float32)
        f = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w, transpose_w)), argnums=(0, 1)))
        ops = _dot_operand_types(f.lower(x, w).compile().as_text())
        assert len(ops) == 2, ops  # input gradient, weight gradient (the unused forward is dropped)
        assert all(t == ("bf16", "bf16") for t in ops), ops
        plain = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w.astype(x.dtype).T if transpose_w else
                                                              w.astype(x.dtype), preferred_element_type=jnp.float32)),
                                 argnums=(0, 1)))
        assert any(t != ("bf16", "bf16") for t in _dot_operand_types(plain.lower(x, w).compile().as_text()))


def _attention_reference(q, k, v, mask, scale, do):
    """Float64 NumPy GQA attention and its gradients by the textbook softmax backward (rowsum(dP * P)).
    q [B, H, T, hd], k / v [B, Hkv, S, hd], mask [B, T, S], do [B, H, T, hd]."""
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.where(mask[:, None], np.einsum("bhqd,bhkd->bhqk", q, k) * scale, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq, dk, dv = ds @ k, np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ do
    fold = lambda x: x.reshape(x.shape[0], -1, G, *x.shape[2:]).sum(2)  # noqa: E731 - sum over each KV group
    return o, dq, fold(dk), fold(dv)


@pytest.mark.parametrize("dtype,T,tol,tiles", [
    ("float32", 16, 1e-4, None), ("float32", 13, 1e-4, None), ("bfloat16", 16, 2e-2, None),
    ("float32", 16, 1e-4, (1, 4)), ("float32", 13, 1e-4, (1, 13)), ("bfloat16", 16, 2e-2, (1, 8))])
def test_attention_core_gradients(dtype, T, tol, tiles):
    """The attention core's written-out backward (delta = rowsum(dO * O), dK^T = Q^T dS, dV^T = dO^T W) against
    float64 NumPy on random GQA inputs with causal + padding masks (a fully masked query row included); untiled,
    and tiled (``tiles``: batch rows per tile, query positions per causal tile) as on XLA:CPU at training sizes."""
    if tiles is not None:
        set_tuning(attention_tiles=tiles)

    B, H, Hkv, hd = 2, 6, 2, 8
    G = H // Hkv
    rng = np.random.RandomState(T)
    q, do = rng.randn(B, H, T, hd), rng.randn(B, H, T, hd)
    k, v = rng.randn(B, Hkv, T, hd), rng.randn(B, Hkv, T, hd)
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[1, :, :3] = False  # row 1 left-padded by 3: its first 3 query rows see no key at all
    seen = mask.any(-1)[:, None, :, None]  # [B, 1, T, 1] query rows with a visible key
    if tiles is not None:
        # a query row with no visible key (padding) averages the values of its tile's keys, not of all S: such
        # rows never reach a real position's output, and the cotangent reaching them is zero (as in training)
        do = do * seen
    scale = hd ** -0.5
    dt = jnp.dtype(dtype)
    cast = lambda x: jnp.asarray(x, dt)  # noqa: E731
    q16, k16, v16, do16 = (np.asarray(cast(x), np.float64) for x in (q, k, v, do))  # the inputs as rounded
    o_ref, dq_ref, dk_ref, dv_ref = _attention_reference(q16, k16, v16, mask, scale, do16)

    def core(qg, kt, vt):
        return attention_core(qg, kt, vt, jnp.asarray(mask), scale, False, tiles is not None)

    qg = cast(q).reshape(B, Hkv, G * T, hd)  # head k*G + g at row g*T + t
    o, vjp = jax.vjp(jax.jit(core), qg, cast(k), cast(v))
    dq, dk, dv = vjp(cast(do).reshape(B, Hkv, G * T, hd))
    for got, ref in ((o, o_ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert got.dtype == dt
        got = np.asarray(got, np.float64).reshape(ref.shape)
        if tiles is not None and ref is o_ref:
            got, ref = got * seen, ref * seen
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol * np.abs(ref).max())


def _rope_np(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, :, None] + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin[:, :, None]


def _rope_np_transpose(g, cos, sin):
    half = g.shape[-1] // 2
    gs = g * sin[:, :, None]
    return g * cos[:, :, None] + np.concatenate([gs[..., half:], -gs[..., :half]], -1)


@pytest.mark.parametrize("tiles,bias", [(None, True), ((1, 8), True), ((2, 4), False)])
def test_attention_block_against_numpy(tiles, bias):
    """``attention_block`` (projections, RoPE and GQA attention from a layer's normed input, flash-style backward
    recomputing everything from the input and the saved output and log-sum-exp) against float64 NumPy: output and
    the gradients of the input, the three weights and biases, on random bf16 inputs with a causal + left-padding
    mask; untiled, and over batch-row and causal query tiles. Rows with no visible key get no cotangent, as in
    training (their output is the mean of their tile's values)."""
    if tiles is not None:
        set_tuning(attention_tiles=tiles)
    B, T, D, H, Hkv, hd = 2, 16, 24, 6, 2, 8
    rng = np.random.RandomState(3 + bool(tiles))
    bf = jnp.bfloat16
    r16 = lambda *shape: np.asarray(jnp.asarray(rng.randn(*shape), bf), np.float64)  # noqa: E731
    h, wq, wk, wv = r16(B, T, D), r16(D, H * hd) / 4, r16(D, Hkv * hd) / 4, r16(D, Hkv * hd) / 4
    bq, bk, bv = (r16(n) / 4 if bias else None for n in (H * hd, Hkv * hd, Hkv * hd))
    pos = np.maximum(np.arange(T)[None] - np.array([[0], [5]]), 0)
    freq = pos[..., None] * (1e4 ** (-np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(np.concatenate([freq, freq], -1)), np.sin(np.concatenate([freq, freq], -1))
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[1, :, :5] = False  # row 1 left-padded by 5
    seen = mask.any(-1)  # [B, T]
    do = r16(B, T, H * hd) * seen[..., None]
    scale = hd ** -0.5

    def proj(w, b_, n):
        return (h @ w + (0 if b_ is None else b_)).reshape(B, T, n, hd)

    q, k, v = _rope_np(proj(wq, bq, H), cos, sin), _rope_np(proj(wk, bk, Hkv), cos, sin), proj(wv, bv, Hkv)
    heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B, T, N, hd] -> [B, N, T, hd]
    o_ref, dq, dk, dv = _attention_reference(heads(q), heads(k), heads(v), mask, scale,
                                             heads(do.reshape(B, T, H, hd)))
    o_ref = heads(o_ref).reshape(B, T, H * hd)
    dq = _rope_np_transpose(heads(dq), cos, sin).reshape(B * T, -1)
    dk = _rope_np_transpose(heads(dk), cos, sin).reshape(B * T, -1)
    dv = heads(dv).reshape(B * T, -1)
    h2 = h.reshape(B * T, D)
    ref = {"h": (dq @ wq.T + dk @ wk.T + dv @ wv.T).reshape(B, T, D), "wq": h2.T @ dq, "wk": h2.T @ dk,
           "wv": h2.T @ dv, "bq": dq.sum(0), "bk": dk.sum(0), "bv": dv.sum(0)}

    args = [jnp.asarray(a, bf) for a in (h, wq, wk, wv)] + [
        None if b_ is None else jnp.asarray(b_, jnp.float32) for b_ in (bq, bk, bv)]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    block = jax.jit(lambda *a: attention_block(*a, f32(cos), f32(sin), jnp.asarray(mask),
                                               (H, Hkv, hd, scale, False)))
    o, vjp = jax.vjp(block, *args)
    grads = dict(zip(("h", "wq", "wk", "wv", "bq", "bk", "bv"), vjp(jnp.asarray(do, bf))))
    assert o.dtype == bf and grads["h"].dtype == bf and grads["wq"].dtype == bf
    got = np.asarray(o, np.float64) * seen[..., None]
    np.testing.assert_allclose(got, o_ref * seen[..., None], rtol=0, atol=2e-2 * np.abs(o_ref).max())
    for name, r in ref.items():
        if not bias and name.startswith("b"):
            assert grads[name] is None
            continue
        g = np.asarray(grads[name], np.float64)
        assert grads[name].dtype == args[list(ref).index(name)].dtype
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-2 * np.abs(r).max(), err_msg=name)


@pytest.mark.parametrize("remat", [False, True])
def test_attention_block_model_gradients(remat):
    """A bf16 Qwen2 (query / key / value biases) on XLA:CPU with ``attention_block`` forced into tiles of one
    batch row and 8 query positions against the plain attention path (``Tuning.attention_block`` off): the same logits at
    real positions (to float32 summation order), parameter gradients within bf16 rounding, with and without remat;
    left padding in one row."""
    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", remat=remat, qkv_bias=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(6)))
    assert "bq" in params["layers"]
    rng = np.random.RandomState(1)
    params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.randn(*a.shape), a.dtype), params)  # biases != 0
    ids = jnp.asarray(_ids(64, (3, 32), seed=9))
    am = jnp.asarray(np.arange(32)[None, :] >= np.array([[0], [7], [0]]))

    def run():
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=am)
            return (jax.nn.log_softmax(logits, -1)[..., 5] * am).sum(), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    set_tuning(attention_tiles=(1, 8))
    assert attention_block_on(jnp.zeros((1, 8), jnp.bfloat16))
    (_, logits_b), g_b = run()
    set_tuning(attention_block=False)
    assert not attention_block_on(jnp.zeros((1, 8), jnp.bfloat16))
    (_, logits_p), g_p = run()
    real = np.asarray(am)
    lb, lp = np.asarray(logits_b, np.float64)[real], np.asarray(logits_p, np.float64)[real]
    np.testing.assert_allclose(lb, lp, rtol=0, atol=1e-2 * np.abs(lp).max())  # equal here; the joint q/k/v GEMM
    # may sum in another float32 order on other builds
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_b), jax.tree.leaves(g_p)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(b).max() > 0, path
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 2e-2, (jax.tree_util.keystr(path), rel)


def test_attention_tiles_on_cpu():
    """XLA:CPU tiles the training attention: SmolLM2's 16 x 256 tokens in tiles of 2 batch rows (~4.7 MB of
    float32 scores) and, with a causal mask, 64 query positions; no query tiles without one or for short rows."""
    row = 3 * 768 * 256 * 4  # Hkv * G*T * S float32 scores of one batch row
    assert attention_tiles(16, 256, 256, row, True) == (2, 64)
    assert attention_tiles(16, 256, 256, row, False) == (2, 256)
    assert attention_tiles(4, 32, 32, 3 * 96 * 32 * 4, True) == (4, 32)  # small: one tile
    assert attention_tiles(5, 192, 192, 4 << 20, True) == (1, 64)  # 5 rows: tiles of one


def test_bf16_model_gradient_gemms_stay_bf16():
    """Every GEMM of a bf16-compute model's compiled gradient (projections, attention forward and backward, LM
    head) takes bf16 operands on XLA:CPU: a batched dot whose operand is a folded transpose, or that contracts
    both operands' rows, would be converted to float32 (plain autodiff of the attention does both)."""
    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", tie_word_embeddings=True)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    ids = jnp.asarray(_ids(64, (2, 16), seed=3))
    f = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).astype(jnp.float32).mean()))
    hlo = f.lower(params).compile().as_text()
    ops = _dot_operand_types(hlo)
    assert all(t == ("bf16", "bf16") for t in ops), ops
    batched = [line for line in hlo.splitlines() if " dot(" in line and "lhs_batch_dims" in line]
    assert len(batched) >= 6, batched  # attention: scores and output forward, four GEMMs backward
    assert len(ops) >= 6 + 3 * 7, ops  # and each projection forward, input and weight gradient


@pytest.mark.parametrize("remat", [False, True])
def test_bf16_layer_scan_saves_residuals_as_bits(remat):
    """A bf16 layer scan on XLA:CPU stacks its backward residuals as uint16 bits, never as bf16 (XLA:CPU computes a
    bf16 dynamic-update-slice in float32: the no-remat SmolLM2 update took 24 s instead of 10), with no weight
    copies among them; the gradients equal those of the same scan saving bf16 residuals (within bf16 rounding
    without remat, where the marks force roundings XLA may otherwise skip), on random weights."""
    from softgrpo_jax.models import ModelConfig, Transformer

    L = 3
    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=L,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", remat=remat)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(4)))
    ids = jnp.asarray(_ids(64, (2, 16), seed=5))
    mask = jnp.asarray(np.arange(16)[None, :] >= np.array([[0], [5]]))  # left padding in one row

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
        return (jax.nn.log_softmax(logits, -1)[..., 7] * mask).sum()

    def stacked_residuals():
        fwd_scan = next(e for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns if e.primitive.name == "scan")
        return [v.aval for v in fwd_scan.outvars if v.aval.shape[:1] == (L,)]

    stacked = stacked_residuals()
    dtypes = {str(a.dtype) for a in stacked}
    assert "uint16" in dtypes and "bfloat16" not in dtypes, stacked
    weight_shapes = {tuple(a.shape) for a in jax.tree.leaves(params) if a.ndim == 3 and a.shape[0] == L}
    assert not [a for a in stacked if tuple(a.shape) in weight_shapes], stacked
    # without remat: the layer input; the attention block's input, output and log-sum-exp (it recomputes its
    # projections and softmax weights); the MLP's residual sum and input (the tiled MLP recomputes gate and up).
    # With remat: the layer input and the attention's output and log-sum-exp (the recomputed forward skips it)
    assert len(stacked) == (3 if remat else 6), stacked
    assert [str(a.dtype) for a in stacked].count("float32") == 1, stacked  # the log-sum-exp

    g_bits = jax.jit(jax.grad(loss))(params)
    set_tuning(residuals_as_bits=False)
    assert "bfloat16" in {str(a.dtype) for a in stacked_residuals()}  # the switch works: the previous behaviour
    g_plain = jax.jit(jax.grad(loss))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_bits), jax.tree.leaves(g_plain)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a).max() > 0, path
        if remat:  # only the layer input is marked: the very same computation
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:  # the marks round to bf16 where XLA may keep excess precision: equal within bf16 rounding
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert rel < 2e-2, (jax.tree_util.keystr(path), rel)


def test_float32_scan_saves_only_weight_gemm_outputs():
    """A float32 layer scan on XLA:CPU without remat stacks only its weight GEMMs' outputs (and the carry) for the
    backward (norms, RoPE, SwiGLU and attention recomputed): fewer stacked residuals than a plain backward saves,
    less temporary memory, and the same gradients, on random weights with padding."""
    from softgrpo_jax.models import ModelConfig, Transformer

    L = 3
    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=L,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(6)))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), params)
    ids = jnp.asarray(_ids(64, (2, 16), seed=8))
    mask = jnp.asarray(np.arange(16)[None, :] >= np.array([[0], [4]]))

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
        return (jax.nn.log_softmax(logits, -1)[..., 11] * mask).sum()

    def stacked_and_temp():
        fwd_scan = next(e for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns if e.primitive.name == "scan")
        stacked = [v.aval for v in fwd_scan.outvars if v.aval.shape[:1] == (L,)]
        temp = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
        return stacked, temp, jax.jit(jax.grad(loss))(params)

    dots, temp_dots, g_dots = stacked_and_temp()
    set_tuning(save_only_dots_f32=False)
    plain, temp_plain, g_plain = stacked_and_temp()
    # saved: the layer input (the carry), q, k, v, the attention output projection's input, gate and up (7 here);
    # the plain backward adds the norms' outputs and statistics, RoPE'd q and k, the attention probabilities, the
    # SwiGLU output, the residual sums
    assert len(dots) < len(plain), (dots, plain)
    assert sum(np.prod(a.shape) for a in dots) < 0.8 * sum(np.prod(a.shape) for a in plain), (dots, plain)
    assert temp_dots < temp_plain, (temp_dots, temp_plain)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_dots), jax.tree.leaves(g_plain)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


def test_tuning_change_after_compile_is_not_ignored():
    """A knob read while tracing, changed after the function compiled: the next call retraces under the new value
    (JAX's caches are cleared); setting the same value again keeps the compiled function; use_tuning restores."""
    traces = []

    @jax.jit
    def rows(h):
        traces.append(1)
        return jnp.int32(mlp.mlp_tile_rows(h))

    h = jnp.zeros((1, 4096, 8), jnp.bfloat16)
    assert int(rows(h)) == 512 and len(traces) == 1
    set_tuning(mlp_tile_rows=64)
    assert int(rows(h)) == 64 and len(traces) == 2
    set_tuning(mlp_tile_rows=64)
    assert int(rows(h)) == 64 and len(traces) == 2
    with use_tuning(mlp_tile_rows=0):
        assert int(rows(h)) == 0
    assert tuning().mlp_tile_rows == 64 and int(rows(h)) == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuning().mlp_tile_rows = 8
    with pytest.raises(ValueError, match="mlp_tile_rows"):
        Tuning(mlp_tile_rows=-1)


def _masked_attention_np(q, k, v, seg, scale):
    """Float64 NumPy causal GQA attention within segments: q [B, T, H, hd], k / v [B, T, Hkv, hd], seg [B, T]."""
    B, T, H, hd = q.shape
    G = H // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    m = (np.arange(T)[:, None] >= np.arange(T)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    s = np.where(m[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vv)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_splash_attention_against_numpy(dtype, tol):
    """JAX's splash attention kernel (Pallas interpret mode on CPU) as ops.attention wraps it: GQA, causal within
    segments, on a left-padded row and a row packing three sequences, T not a multiple of the kernel's block;
    values against float64 NumPy and gradients against autodiff of that reference."""
    from softgrpo_jax.ops.attention import attention_splash

    B, T, H, Hkv, hd = 2, 20, 6, 2, 16
    rng = np.random.RandomState(7)
    dt = jnp.dtype(dtype)
    q, c = (jnp.asarray(rng.randn(B, T, H, hd), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(B, T, Hkv, hd), dt) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    seg[0, :4] = 0  # left padding
    seg[1, 8:15], seg[1, 15:] = 2, 3  # three packed sequences
    scale = hd ** -0.5

    def ref(q, k, v):  # the same formula in jnp float32 for gradients
        G = H // Hkv
        s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, G, 2)) * scale
        m = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
        p = jax.nn.softmax(jnp.where(m[:, None], s, -1e30), -1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, G, 2))

    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    o = jax.jit(lambda *a: attention_splash(*a, jnp.asarray(seg), scale))(q, k, v)
    want = _masked_attention_np(*(np.asarray(a, np.float64) for a in (q, k, v)), seg, scale)
    assert o.dtype == dt and o.shape == (B, T, H, hd)
    np.testing.assert_allclose(np.asarray(o, np.float64), want, rtol=0, atol=tol * np.abs(want).max())
    g = jax.jit(jax.grad(lambda *a: jnp.sum((attention_splash(*a, jnp.asarray(seg), scale) * c)
                                            .astype(jnp.float32)), argnums=(0, 1, 2)))(q, k, v)
    gr = jax.grad(lambda *a: jnp.sum(ref(*a) * jnp.asarray(c, jnp.float32)), argnums=(0, 1, 2))(*f32)
    for name, a, b in zip("qkv", g, gr):
        b = np.asarray(b, np.float64)
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=tol * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("remat", [False, True])
def test_splash_model_equals_xla(remat):
    """A Qwen2-shaped model with attention="splash" (the kernel in interpret mode) gives the XLA path's logits at
    real positions and its parameter gradients, for left-padded, right-padded and holed rows."""
    from softgrpo_jax.models import ModelConfig, Transformer

    base = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, remat=remat)
    ids = jnp.asarray(_ids(64, (3, 19), seed=4))
    mask = np.ones((3, 19), bool)
    mask[0, :5] = False
    mask[1, 13:] = False
    mask[2, :2] = mask[2, 9] = False
    mask = jnp.asarray(mask)
    w = jnp.asarray(np.random.RandomState(2).standard_normal((3, 19, 64)), jnp.float32) * mask[..., None]
    out = {}
    for impl in ("xla", "splash"):
        graphdef, params = nnx.split(Transformer(base.replace(attention=impl), rngs=nnx.Rngs(3)))

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits, -1) * w), logits

        out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, lx), gx = out["xla"]
    (_, ls), gs = out["splash"]
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(ls)[real], np.asarray(lx)[real], rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gs), jax.tree.leaves(gx)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(b).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_splash_on_a_mesh_runs_per_shard():
    """Under a data-parallel mesh (the trainer's ``activation_sharding``) the splash kernel runs on each device's
    own rows and KV heads (shard_map; a Pallas call has no SPMD partitioning rule): the forward and its gradient
    compile without any collective but the gradient's reductions over the batch, and equal the unsharded ones."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from softgrpo_jax.distributed import activation_sharding, make_mesh
    from softgrpo_jax.hlo import collectives
    from softgrpo_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, attention="splash")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    ids = jnp.asarray(_ids(64, (8, 19), seed=4))
    mask = jnp.asarray(np.arange(19)[None, :] >= np.arange(8)[:, None])  # left padding of 0..7 slots

    def loss(p, ids, mask):
        with activation_sharding(mesh):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
        return jnp.sum(jax.nn.log_softmax(logits, -1) * mask[..., None]), logits

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    mesh = None
    (_, ref), gref = f(params, ids, mask)
    mesh = make_mesh((8, 1, 1))
    rows = NamedSharding(mesh, P("data"))
    args = (params, jax.device_put(ids, rows), jax.device_put(mask, rows))
    hlo = f.lower(*args).compile().as_text()
    assert {op for op, _ in collectives(hlo)} <= {"all-reduce"}, collectives(hlo)[:3]
    (_, got), g = f(*args)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)], np.asarray(ref)[np.asarray(mask)], rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("S", [64, 96, 256])
def test_pallas_decode_attention_against_numpy(S):
    """The Pallas decode-attention kernel (interpret mode) as ops.attention wraps it: per-row valid ranges
    [start, length) of a left-padded cache, GQA, against float64 NumPy; slots outside a row's range hold garbage
    (large values) that must not leak in."""
    from softgrpo_jax.ops.attention import decode_attention_pallas

    B, H, Hkv, hd = 3, 6, 2, 16
    rng = np.random.RandomState(S)
    q = rng.randn(B, H, hd).astype(np.float32)
    kt, vt = (rng.randn(B, Hkv, S, hd).astype(np.float32) for _ in range(2))
    start = np.array([0, 5, S // 2])
    length = np.array([S, S - 3, S // 2 + 7])
    for b in range(B):  # garbage outside the valid range
        kt[b, :, :start[b]] = vt[b, :, :start[b]] = 1e4
        kt[b, :, length[b]:] = vt[b, :, length[b]:] = -1e4
    o = jax.jit(lambda *a: decode_attention_pallas(*a, hd ** -0.5))(q, kt, vt, start, length)
    G = H // Hkv
    for b in range(B):
        k = np.repeat(kt[b, :, start[b]:length[b]], G, axis=0).astype(np.float64)  # [H, n, hd]
        v = np.repeat(vt[b, :, start[b]:length[b]], G, axis=0).astype(np.float64)
        s = np.einsum("hd,hnd->hn", q[b], k) * hd ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(o[b]), np.einsum("hn,hnd->hd", p, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_layer,kernel", [(False, "gpu"), (True, "gpu"), (False, "tpu"), (True, "tpu")])
def test_cached_decoding_with_pallas_decode_attention(per_layer, kernel):
    """Decode steps through the Pallas decode-attention kernels (GPU's and TPU's, interpret mode) give the XLA
    path's logits, on left-padded prompts of different lengths, with the stacked (scan: TPU's kernel reads the
    stacked cache at the layer index) and per-layer cache layouts."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models.transformer import forward, init_cache, unstack_layers

    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = Transformer(cfg, rngs=nnx.Rngs(5)).param_tree()
    if per_layer:
        params = unstack_layers(params)
    B, P, S = 3, 8, (32 if kernel == "gpu" else 128)
    ids = jnp.asarray(_ids(64, (B, P), seed=2))
    mask = jnp.asarray(np.arange(P)[None, :] >= np.array([[0], [3], [6]]))
    steps = jnp.asarray(_ids(64, (B, 6), seed=3))
    out = {}
    for impl in ("xla", "pallas_" + kernel):
        cache = init_cache(cfg, B, S, per_layer=per_layer)
        _, cache = jax.jit(lambda p, c: forward(cfg, p, ids, attention_mask=mask, cache=c, last_only=True,
                                                fresh_cache=True))(params, cache)
        step = jax.jit(lambda p, t, c: forward(cfg, p, t[:, None], cache=c, decode_attention=impl))
        logits = []
        for j in range(steps.shape[1]):
            lg, cache = step(params, steps[:, j], cache)
            logits.append(np.asarray(lg[:, 0]))
        out[impl] = np.stack(logits, 1)
    assert np.abs(out["xla"]).max() > 0.1
    np.testing.assert_allclose(out["pallas_" + kernel], out["xla"], rtol=1e-4, atol=1e-4)


def _np_decode_attention(q, k, v, start, length, scale):
    """float64 NumPy: each row's queries (GQA groups of H // Hkv) against its slots [start, length)."""
    B, H, hd = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, hd))
    for b in range(B):
        kk = np.repeat(k[b, :, start[b]:length[b]], G, axis=0).astype(np.float64)  # [H, n, hd]
        vv = np.repeat(v[b, :, start[b]:length[b]], G, axis=0).astype(np.float64)
        s = np.einsum("hd,hnd->hn", q[b].astype(np.float64), kk) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hn,hnd->hd", p / p.sum(-1, keepdims=True), vv)
    return out


@pytest.mark.parametrize("S,hd,dtype", [(256, 16, "float32"), (384, 64, "float32"), (1024, 128, "bfloat16")])
def test_tpu_decode_attention_against_numpy(S, hd, dtype):
    """The Pallas TPU decode-attention kernel (interpret mode, blocks of 8 and of 2 rows) on a stacked cache
    [L, B, Hkv, S, hd] at layer 1: per-row valid ranges [start, length) that start and end inside blocks, span
    several blocks or one slot, rows of one block needing different blocks, GQA,
    against float64 NumPy; slots outside a row's range (and the other layers) hold garbage that must not leak in.
    Through ``decode_attention`` the GPU kernel reads the same stacked cache at the same layer alike."""
    from softgrpo_jax.ops.attention import decode_attention, decode_attention_tpu

    B, H, Hkv, L = 8, 6, 2, 3
    rng = np.random.RandomState(S)
    q = rng.randn(B, H, hd).astype(np.float32)
    k, v = (rng.randn(L, B, Hkv, S, hd).astype(np.float32) for _ in range(2))
    start = np.array([0, 5, S // 2, 130, 0, 129, 3, S - 1])
    length = np.array([S, S - 3, S // 2 + 7, 131, 1, 255, 200, S])
    for b in range(B):
        k[:, b, :, :start[b]] = v[:, b, :, :start[b]] = 1e4
        k[:, b, :, length[b]:] = v[:, b, :, length[b]:] = -1e4
    k[[0, 2]], v[[0, 2]] = 5e3, -5e3
    qd, kd, vd = (jnp.asarray(a, dtype) for a in (q, k, v))
    ref = _np_decode_attention(*(np.asarray(a, np.float64) for a in (qd, kd[1], vd[1])), start, length, hd ** -0.5)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for rows in (None, 2):  # blocks of 8 rows (the default here) and of 2
        o = jax.jit(lambda *a: decode_attention_tpu(*a, hd ** -0.5, rows=rows))(qd, kd, vd, jnp.int32(1), start,
                                                                               length)
        assert o.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(o, np.float64), ref, rtol=tol, atol=tol, err_msg=f"rows={rows}")
    g = jax.jit(lambda *a: decode_attention(*a, hd ** -0.5, layer=jnp.int32(1), kernel="gpu"))(qd, kd, vd, start,
                                                                                              length)
    np.testing.assert_allclose(np.asarray(g, np.float64), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="multiple of 128"):
        decode_attention_tpu(qd, kd[:, :, :, :100], vd[:, :, :, :100], 1, start, length, 1.0)


@pytest.mark.parametrize("H,Hkv,hd,S", [(12, 2, 128, 9216), (9, 3, 64, 1280)])
def test_tpu_decode_attention_lowers_for_tpu(H, Hkv, hd, S):
    """The TPU kernel lowers to a Mosaic custom call for TPU from this machine (``jax.export`` for platform tpu,
    no TPU needed): Qwen2.5-1.5B's heads over the seed's 1024 + 8192 slots, and SmolLM2's, bf16. This runs
    Pallas' Mosaic lowering (block shapes, the ops the kernel and its index maps use); the Mosaic compiler itself
    runs only on a TPU."""
    from softgrpo_jax.ops.attention import decode_attention_tpu

    B, L = 16, 4
    sds = jax.ShapeDtypeStruct
    cache = sds((L, B, Hkv, S, hd), jnp.bfloat16)
    f = jax.jit(lambda q, k, v, i, s, n: decode_attention_tpu(q, k, v, i, s, n, hd ** -0.5, interpret=False))
    text = jax.export.export(f, platforms=["tpu"])(sds((B, H, hd), jnp.bfloat16), cache, cache, sds((), jnp.int32),
                                                   sds((B,), jnp.int32), sds((B,), jnp.int32)).mlir_module()
    assert "tpu_custom_call" in text
