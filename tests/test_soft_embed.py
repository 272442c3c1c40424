"""soft_embed: the Pallas kernels (GPU/Triton under the generic interpreter, TPU/Mosaic under TPU interpret mode)
against the XLA path, the dispatch rules, the custom VJP, and the kernels' lowering for cuda and tpu.

Poisoning: both interpreters allocate a pallas_call's outputs (and TPU scratch buffers) filled with NaN before the
kernel runs (test_interpreters_poison_outputs checks this premise), so an element a kernel fails to write shows up
as NaN; every comparison also asserts finiteness. Inputs are random and never zero.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from softgrpo_jax.ops import pallas_gpu, pallas_tpu

se = importlib.import_module("softgrpo_jax.ops.soft_embed")  # the module (softgrpo_jax.ops.soft_embed is the function)

V = 48  # small vocabulary: interpret mode is slow; ids repeat across tokens by construction
N = 37  # not a multiple of any block size used below
N_TPU = 21  # TPU interpret mode simulates every row DMA: fewer tokens (still 2-3 blocks, the last one partial)
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


def _problem(seed, n, k, d, dtype, v=V, lead=None):
    """Random table, ids with repeats and out-of-order slots, nonzero weights, ytil and a discrete mask."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((v, d)) + 0.25).astype(np.float32)
    ids = rng.integers(0, v, size=(n, k)).astype(np.int32)
    if k > 1:
        ids[::3, 1] = ids[::3, 0]  # the same row twice in one token
    ids[n // 2] = ids[1][::-1]  # a token repeating another's ids in reverse order
    ids[-1] = v - 1 - np.arange(k) % v  # descending ids, including the last table row
    weights = rng.uniform(0.05, 1.0, size=(n, k)).astype(np.float32)
    ytil = (np.log(rng.dirichlet(np.ones(k), size=n) + 1e-6) + rng.gumbel(size=(n, k))).astype(np.float32)
    disc = rng.random(n) < 0.3
    disc[0] = True
    if lead is not None:
        ids, weights, ytil = (x.reshape(*lead, k) for x in (ids, weights, ytil))
        disc = disc.reshape(lead)
    return (jnp.asarray(table, dtype), jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(ytil),
            jnp.asarray(disc))


def _numpy_ref(table, ids, weights):
    t = np.asarray(table.astype(jnp.float32), np.float64)
    return np.einsum("...k,...kd->...d", np.asarray(weights, np.float64), t[np.asarray(ids)])


def _assert_close(out, ref_xla, ref64, dtype):
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "NaN/inf in the kernel output: an element was not written (poisoned)"
    if dtype == jnp.bfloat16:
        # both round a float32 accumulation to bf16: at most one bf16 ulp apart, and within one ulp of exact
        np.testing.assert_allclose(out, np.asarray(ref_xla.astype(jnp.float32)), rtol=2 ** -7, atol=1e-5)
        np.testing.assert_allclose(out, ref64, rtol=2 ** -7, atol=1e-5)
    else:
        np.testing.assert_allclose(out, np.asarray(ref_xla), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out, ref64, rtol=1e-5, atol=1e-5)


# K in {1, 5, 8, 15, 30} x {f32, bf16}, D cycling through {576, 1536, 3584} so each D meets both dtypes.
CASES = [(k, d, dt) for i, (k, dt) in enumerate([(k, dt) for k in (1, 5, 8, 15, 30)
                                                 for dt in (jnp.float32, jnp.bfloat16)])
         for d in [(576, 1536, 3584)[i % 3]]]


def test_interpreters_poison_outputs():
    """The premise of the poisoning: an output element no kernel step writes comes back NaN in both interpreters."""
    def kern(o_ref):
        o_ref[...] = jnp.ones(o_ref.shape, o_ref.dtype)

    out_shape = jax.ShapeDtypeStruct((16, 128), jnp.float32)
    spec = pl.BlockSpec((8, 128), lambda i: (0, 0))  # only the first block is ever written
    for interp in (True, TPU_INTERPRET):
        out = np.asarray(pl.pallas_call(kern, out_shape=out_shape, grid=(1,), out_specs=spec, interpret=interp)())
        assert (out[:8] == 1).all() and np.isnan(out[8:]).all()


@pytest.mark.parametrize("k,d,dtype", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_gpu_kernel_plain(k, d, dtype):
    table, ids, w, _, _ = _problem(k * 7 + d, N, k, d, dtype)
    # column blocks: 256 leaves a masked partial block for D=576, 512 divides 1536 and 3584
    cfg = pallas_gpu.GpuConfig(block_tokens=8, block_cols=256 if d == 576 else 512, num_warps=4,
                               cols_fastest=k % 2 == 1)  # both launch orders
    out = se.soft_embed(table, ids, w, impl="pallas", interpret=True, kernel="gpu", config=cfg)
    _assert_close(out, se.soft_embed(table, ids, w, impl="xla"), _numpy_ref(table, ids, w), dtype)


@pytest.mark.parametrize("k,d,dtype", [(1, 576, jnp.float32), (5, 1536, jnp.bfloat16), (8, 3584, jnp.float32),
                                       (15, 576, jnp.bfloat16), (30, 1536, jnp.float32)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_tpu_kernel_plain(k, d, dtype):
    table, ids, w, _, _ = _problem(k * 11 + d, N_TPU, k, d, dtype)
    bt = 16 if dtype == jnp.bfloat16 else 8
    cfg = pallas_tpu.TpuConfig(block_tokens=bt)
    out = se.soft_embed(table, ids, w, impl="pallas", interpret=TPU_INTERPRET, kernel="tpu", config=cfg)
    _assert_close(out, se.soft_embed(table, ids, w, impl="xla"), _numpy_ref(table, ids, w), dtype)


def test_tpu_kernel_chunked_prefetch():
    """N split over several calls (SMEM budget) writing one aliased output; the partial block in the last chunk."""
    k, d = 5, 576
    table, ids, w, _, _ = _problem(3, 45, k, d, jnp.float32)
    cfg = pallas_tpu.TpuConfig(block_tokens=8, max_prefetch_ids=16 * k)  # chunks of 16 tokens: 16, 16, 13
    out = se.soft_embed(table, ids, w, impl="pallas", interpret=TPU_INTERPRET, kernel="tpu", config=cfg)
    _assert_close(out, se.soft_embed(table, ids, w, impl="xla"), _numpy_ref(table, ids, w), jnp.float32)


@pytest.mark.parametrize("kernel,k,d,dtype,tau_kind", [
    ("gpu", 5, 1536, jnp.bfloat16, "scalar"),
    ("gpu", 8, 576, jnp.float32, "rows"),
    ("gpu", 30, 3584, jnp.float32, "scalar"),
    ("tpu", 5, 1536, jnp.bfloat16, "rows"),
    ("tpu", 15, 576, jnp.float32, "scalar"),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_fused_with_discrete_mask(kernel, k, d, dtype, tau_kind):
    """The fused form on a [B, T] batch: softmax(ytil / tau) in the kernel, one-hot on slot 0 where discrete."""
    b, t = (3, 13) if kernel == "gpu" else (3, 7)  # N = 39 / 21
    table, ids, _, ytil, disc = _problem(k + d, b * t, k, d, dtype, lead=(b, t))
    tau = 0.1 if tau_kind == "scalar" else jnp.asarray([[0.1], [0.5], [1.3]], jnp.float32)  # [B, 1] per row
    if kernel == "gpu":
        cfg = pallas_gpu.GpuConfig(block_tokens=8, block_cols=64 if d == 576 else 512)
        interp = True
    else:
        cfg = pallas_tpu.TpuConfig(block_tokens=16 if dtype == jnp.bfloat16 else 8)
        interp = TPU_INTERPRET
    out = se.soft_embed_fused(table, ids, ytil, tau, disc, impl="pallas", interpret=interp, kernel=kernel, config=cfg)
    assert out.shape == (b, t, d) and out.dtype == dtype
    ref = se.soft_embed_fused(table, ids, ytil, tau, disc, impl="xla")
    w = se.soft_weights(ytil, tau, disc)
    assert np.asarray(w[disc][:, 1:] == 0).all()
    _assert_close(out, ref, _numpy_ref(table, ids, w), dtype)
    # discrete rows are exactly the embedding of slot 0
    np.testing.assert_allclose(np.asarray(out[disc].astype(jnp.float32)),
                               np.asarray(table[ids[disc][:, 0]].astype(jnp.float32)), rtol=1e-6, atol=0)


def test_fused_without_mask_and_default_config():
    k, d = 5, 1536
    table, ids, _, ytil, _ = _problem(9, N, k, d, jnp.float32)
    out = se.soft_embed_fused(table, ids, ytil, 0.25, None, impl="pallas", interpret=True, kernel="gpu")
    ref = se.soft_embed_fused(table, ids, ytil, 0.25, None, impl="xla")
    _assert_close(out, ref, _numpy_ref(table, ids, se.soft_weights(ytil, 0.25)), jnp.float32)


def _grads(fn, cot, *args):
    """Gradients of <fn(*args), cot> with respect to every argument."""
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("kernel,dtype", [("gpu", jnp.float32), ("gpu", jnp.bfloat16), ("tpu", jnp.float32)])
def test_gradients_plain(kernel, dtype):
    k, d = 5, 576
    table, ids, w, _, _ = _problem(21, N, k, d, dtype)
    cot = jax.random.normal(jax.random.key(0), (N, d))
    interp = True if kernel == "gpu" else TPU_INTERPRET
    cfg = pallas_gpu.GpuConfig(block_tokens=8, block_cols=64) if kernel == "gpu" else pallas_tpu.TpuConfig(8 * (
        2 if dtype == jnp.bfloat16 else 1))
    f_k = jax.jit(lambda t, w: se.soft_embed(t, ids, w, impl="pallas", interpret=interp, kernel=kernel, config=cfg))
    f_x = jax.jit(lambda t, w: se.soft_embed(t, ids, w, impl="xla"))
    dt_k, dw_k = _grads(f_k, cot, table, w)
    dt_x, dw_x = _grads(f_x, cot, table, w)
    assert dt_k.dtype == table.dtype and dw_k.dtype == w.dtype
    # bf16: XLA's autodiff scatter-adds repeated rows in bf16, the custom VJP in float32 then rounds once
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2 ** -5, atol=2 ** -5)
    np.testing.assert_allclose(np.asarray(dw_k), np.asarray(dw_x), **tol)
    np.testing.assert_allclose(np.asarray(dt_k.astype(jnp.float32)), np.asarray(dt_x.astype(jnp.float32)), **tol)
    assert float(jnp.abs(dt_k.astype(jnp.float32)).max()) > 0 and float(jnp.abs(dw_k).max()) > 0


def test_gradients_fused():
    """d/d(table, ytil, tau) of the fused form against XLA's autodiff, per-row tau and a discrete mask."""
    k, d, b, t = 8, 576, 3, 13
    table, ids, _, ytil, disc = _problem(5, b * t, k, d, jnp.float32, lead=(b, t))
    tau = jnp.asarray([[0.3], [0.7], [1.1]], jnp.float32)
    cot = jax.random.normal(jax.random.key(1), (b, t, d))
    cfg = pallas_gpu.GpuConfig(block_tokens=8, block_cols=64)
    def f_k(tb, y, ta):
        return se.soft_embed_fused(tb, ids, y, ta, disc, impl="pallas", interpret=True, kernel="gpu", config=cfg)

    def f_x(tb, y, ta):
        return se.soft_embed_fused(tb, ids, y, ta, disc, impl="xla")

    gk = _grads(jax.jit(f_k), cot, table, ytil, tau)
    gx = _grads(jax.jit(f_x), cot, table, ytil, tau)
    for a, b_ in zip(gk, gx):
        assert a.shape == b_.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(gk[1]).max()) > 0 and float(jnp.abs(gk[2]).max()) > 0
    # discrete positions pass no gradient to ytil
    assert float(jnp.abs(gk[1][disc]).max()) == 0


def test_stop_gradient_use_traces_no_backward_kernel():
    """The trainer's use (stop_gradient on the table and ytil) differentiates fine through the custom VJP."""
    table, ids, _, ytil, disc = _problem(2, 16, 5, 576, jnp.float32)
    h = jax.random.normal(jax.random.key(2), (576,))

    def loss(scale):
        e = se.soft_embed_fused(jax.lax.stop_gradient(table), ids, jax.lax.stop_gradient(ytil), 0.1, disc,
                                impl="pallas", interpret=True, kernel="gpu")
        return jnp.sum(jax.lax.stop_gradient(e) @ h * scale)

    g = jax.jit(jax.grad(loss))(2.0)
    assert np.isfinite(float(g))


# ---------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_on_cpu():
    from softgrpo_jax.ops.tuning import Tuning, use_tuning

    assert se.resolve_impl("auto") == "xla"
    assert se.resolve_impl("xla") == "xla"
    assert se.resolve_impl("pallas", interpret=True) == "pallas"
    with pytest.raises(ValueError, match="interpret=True"):
        se.resolve_impl("pallas")
    with pytest.raises(ValueError, match="impl must be"):
        se.soft_embed(jnp.ones((4, 8)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)), impl="triton")
    with use_tuning(Tuning.from_env({se.ENV_IMPL: "pallas"})):
        assert se.resolve_impl("auto") == "pallas"
        assert se.resolve_impl("xla") == "xla"  # the knob only steers auto
    assert se.resolve_impl("auto") == "xla"
    with pytest.raises(ValueError, match=se.ENV_IMPL):
        Tuning.from_env({se.ENV_IMPL: "bogus"})


def test_auto_picks_kernel_only_where_it_would_not_be_replicated(monkeypatch):
    """On a (pretended) GPU: 8 devices outside shard_map -> XLA; inside shard_map over all axes -> the kernel."""
    monkeypatch.setattr(se.jax, "default_backend", lambda: "gpu")
    assert jax.device_count() == 8  # conftest
    assert se.resolve_impl("auto") == "xla"
    seen = {}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(x):
        seen["manual"] = se.resolve_impl("auto")
        return x

    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(jnp.ones(8))
    assert seen["manual"] == "pallas"
    with jax.set_mesh(mesh):
        jax.jit(lambda x: seen.setdefault("auto_mesh", se.resolve_impl("auto")) and x)(jnp.ones(8))
    assert seen["auto_mesh"] == "xla"


def test_xla_path_matches_numpy_and_shapes():
    table, ids, w, _, _ = _problem(1, 12, 5, 576, jnp.float32, lead=(3, 4))
    out = se.soft_embed(table, ids, w, impl="auto")
    assert out.shape == (3, 4, 576)
    np.testing.assert_allclose(np.asarray(out), _numpy_ref(table, ids, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        se.soft_embed(table, ids, w[..., :4])


# ----------------------------------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("d", [576, 1536, 3584])
def test_kernels_lower_for_cuda_and_tpu(d):
    """The Pallas -> Triton IR and Pallas -> Mosaic lowerings run (on CPU, via jax.export) at training shapes.

    This catches "Unimplemented primitive in Pallas Triton lowering" and Mosaic lowering errors without a device;
    the Triton and Mosaic compilers themselves only run on the device.
    """
    n, k, v = 65536, 5, 151936
    table = jax.ShapeDtypeStruct((v, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((n, k), jnp.int32)
    w = jax.ShapeDtypeStruct((n, k), jnp.float32)
    tau_rows = jax.ShapeDtypeStruct((n,), jnp.float32)
    tau_one = jax.ShapeDtypeStruct((1,), jnp.float32)
    disc = jax.ShapeDtypeStruct((n,), jnp.bool_)
    export_cuda = functools.partial(jax.export.export, platforms=["cuda"],
                                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
                                        pallas_gpu.CUSTOM_CALL_TARGET)])

    def cuda(fn):
        # jax >= 0.11 reads the GPU generation for Triton from the device; with none here, name an abstract H100
        def lower(*args):
            mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
                device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"))
            with jax.sharding.use_abstract_mesh(mesh):
                return export_cuda(fn)(*args)
        return lower
    tpu = functools.partial(jax.export.export, platforms=["tpu"])
    for mod, export, marker in ((pallas_gpu, cuda, pallas_gpu.CUSTOM_CALL_TARGET),
                                (pallas_tpu, tpu, "tpu_custom_call")):
        for fn, args in ((mod.soft_embed, (table, ids, w)),
                         (mod.soft_embed_fused, (table, ids, w, tau_rows, disc)),
                         (functools.partial(mod.soft_embed_fused, discrete=None), (table, ids, w, tau_one))):
            assert marker in export(jax.jit(fn))(*args).mlir_module()
    # one program per token: 65536 token blocks exceed CUDA's grid-y limit, Pallas folds them into x
    one = functools.partial(pallas_gpu.soft_embed, config=pallas_gpu.GpuConfig(block_tokens=1, num_warps=2))
    assert f"grid_x = {n * pl.cdiv(d, 512)} " in cuda(jax.jit(one))(table, ids, w).mlir_module()


def test_pallas_path_really_calls_a_kernel():
    table, ids, w, ytil, disc = _problem(4, 8, 5, 576, jnp.float32)
    for kernel, interp in (("gpu", True), ("tpu", TPU_INTERPRET)):
        jp = str(jax.make_jaxpr(lambda t, i, x: se.soft_embed(t, i, x, impl="pallas", interpret=interp,
                                                              kernel=kernel))(table, ids, w))
        assert "pallas_call" in jp and "custom_vjp" in jp
        jp = str(jax.make_jaxpr(lambda t, i, y: se.soft_embed_fused(t, i, y, 0.1, disc, impl="pallas",
                                                                    interpret=interp, kernel=kernel))(table, ids, ytil))
        assert "pallas_call" in jp
    assert "pallas_call" not in str(jax.make_jaxpr(lambda t, i, x: se.soft_embed(t, i, x))(table, ids, w))


def test_default_config_choices():
    """The defaults the GPU sweep chose (benchmarks/RESULTS.md): one token per program, token blocks adjacent at the
    training size; several tokens per program, columns adjacent at decode sizes; a 64-wide block for D=576. Each
    runs correctly (interpret mode) on a problem whose N is not a multiple of the block."""
    big = pallas_gpu.default_config(65536, 1536, 5)
    assert (big.block_tokens, big.block_cols, big.num_warps, big.cols_fastest) == (1, 512, 2, False)
    small = pallas_gpu.default_config(512, 1536, 5)
    assert small.cols_fastest and small.block_cols == 512
    narrow = pallas_gpu.default_config(65536, 576, 5)
    assert narrow.block_cols == 64 and narrow.cols_fastest
    for cfg, d in ((big, 1536), (small, 1536), (narrow, 576)):
        table, ids, w, _, _ = _problem(31, 37, 5, d, jnp.bfloat16)
        out = se.soft_embed(table, ids, w, impl="pallas", interpret=True, kernel="gpu", config=cfg)
        _assert_close(out, se.soft_embed(table, ids, w, impl="xla"), _numpy_ref(table, ids, w), jnp.bfloat16)
