"""Model parity with transformers' PyTorch models, checkpoint round trips, cached decoding, sharding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import make_hf_model, torch_logits
from softgrpo_jax import load_pretrained, save_pretrained
from softgrpo_jax.checkpoint import CheckpointError
from softgrpo_jax.distributed import make_mesh, shard_model
from softgrpo_jax.models import UnsupportedModelError

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = [
    ("qwen2", dict(tie_word_embeddings=False)),  # GQA 4:1, q/k/v bias, untied
    ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=8, vocab_size=101)),  # MHA, tied, odd vocab
    ("llama", dict(tie_word_embeddings=True)),  # GQA 2:1, tied
    ("llama", dict(tie_word_embeddings=False, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE,
                   rope_theta=500000.0)),  # MQA, llama3 rope scaling, untied
    ("llama", dict(attention_bias=True, head_dim=16)),  # q/k/v/o bias, explicit head_dim
]


@pytest.fixture(scope="module", params=range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def hf_pair(request, tmp_path_factory):
    fam, kw = CASES[request.param]
    d = str(tmp_path_factory.mktemp(f"hf{request.param}"))
    tm = make_hf_model(d, fam, seed=request.param, **kw)
    return d, tm


def _ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


def test_logits_parity(hf_pair):
    d, tm = hf_pair
    m = load_pretrained(d)
    ids = _ids(m.config.vocab_size, (2, 37))  # longer than original_max_position_embeddings: scaling matters
    ref = torch_logits(tm, ids)
    out = np.asarray(m(jnp.asarray(ids)))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4


def test_padded_batch_parity(hf_pair):
    """Left- and right-padded rows give the transformers logits at their real positions."""
    d, tm = hf_pair
    m = load_pretrained(d)
    V = m.config.vocab_size
    ids = _ids(V, (3, 20), seed=1)
    mask = np.ones((3, 20), np.int64)
    mask[0, :6] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    out = np.asarray(m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for b in range(3):
        keep = mask[b].astype(bool)
        ref = torch_logits(tm, ids[b:b + 1, keep])[0]
        assert np.abs(out[b, keep] - ref).max() <= 1e-4


def test_export_reload_in_transformers(hf_pair, tmp_path):
    import torch
    import transformers

    d, tm = hf_pair
    m = load_pretrained(d)
    out_dir = str(tmp_path / "export")
    save_pretrained(m, out_dir)
    re = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = _ids(m.config.vocab_size, (2, 19), seed=2)
    a, b = torch_logits(re, ids), np.asarray(m(jnp.asarray(ids)))
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(a - torch_logits(tm, ids)).max() <= 1e-5


def test_hf_orbax_hf_bit_exact(hf_pair, tmp_path):
    from softgrpo_jax.checkpoint import safetensors_io as st

    d, _ = hf_pair
    m = load_pretrained(d)
    save_pretrained(m, str(tmp_path / "ob"), format="orbax")
    m2 = load_pretrained(str(tmp_path / "ob"))
    assert m2.config == m.config
    save_pretrained(m2, str(tmp_path / "hf2"))
    a = dict(st.iter_tensors(os.path.join(d, "model.safetensors")))
    b = dict(st.iter_tensors(str(tmp_path / "hf2" / "model.safetensors")))
    if m.config.tie_word_embeddings:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_inputs_embeds_equals_ids(hf_pair):
    d, _ = hf_pair
    m = load_pretrained(d)
    ids = jnp.asarray(_ids(m.config.vocab_size, (2, 11), seed=3))
    emb = m.embedding_table()[ids]
    np.testing.assert_array_equal(np.asarray(m(ids)), np.asarray(m(inputs_embeds=emb)))
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=emb)
    with pytest.raises(ValueError, match="exactly one"):
        m()


@pytest.mark.parametrize("layout", ["scan", "unrolled", "per_layer"])
def test_cached_decoding_equals_full_forward(hf_pair, layout):
    """Prefill + one-token steps through the KV cache give the full forward's logits, for the layer scan, the
    unrolled stack and per-layer weights (``unstack_layers``, per-layer cache lists: the engine's CPU layout)."""
    from softgrpo_jax.models.transformer import forward, unstack_layers

    d, _ = hf_pair
    m = load_pretrained(d, scan_layers=layout == "scan")
    cfg = m.config
    params = unstack_layers(m.param_tree()) if layout == "per_layer" else m.param_tree()
    V = cfg.vocab_size
    ids = _ids(V, (2, 16), seed=4)
    mask = np.ones((2, 16), bool)
    mask[1, :5] = False  # a left-padded row
    full = np.asarray(m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = m.init_cache(2, 24, per_layer=layout == "per_layer")
    if layout == "per_layer":
        assert isinstance(cache["k"], list) and len(cache["k"]) == cfg.num_layers
    P = 9
    # the engine's prefill: last position only, attention over the prompt's own slots (fresh_cache)
    last, c_fresh = forward(cfg, params, jnp.asarray(ids[:, :P]), attention_mask=jnp.asarray(mask[:, :P]),
                            cache=cache, last_only=True, fresh_cache=True)
    logits, cache = forward(cfg, params, jnp.asarray(ids[:, :P]), attention_mask=jnp.asarray(mask[:, :P]),
                            cache=cache)
    assert np.abs(np.asarray(last) - np.asarray(logits)[:, -1]).max() <= 1e-5
    # the same cache either way, on the real tokens' slots (padding slots are never attended to)
    valid = np.asarray(cache["mask"])  # [B, S]
    for name in ("k", "v"):
        for a, b in zip(jax.tree.leaves(c_fresh[name]), jax.tree.leaves(cache[name])):
            a, b = np.moveaxis(np.asarray(a), -2, -3), np.moveaxis(np.asarray(b), -2, -3)  # [..., B, S, Hkv, hd]
            np.testing.assert_allclose(a[..., valid, :, :], b[..., valid, :, :], atol=1e-5)
    for name in ("mask", "pos", "index"):
        np.testing.assert_array_equal(np.asarray(c_fresh[name]), np.asarray(cache[name]))
    steps = [np.asarray(logits)]
    for t in range(P, 16):
        lg, cache = forward(cfg, params, jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(mask[:, t:t + 1]),
                            cache=cache)
        steps.append(np.asarray(lg))
    got = np.concatenate(steps, axis=1)
    assert np.abs(got[mask] - full[mask]).max() <= 1e-4
    assert int(cache["index"]) == 16
    np.testing.assert_array_equal(np.asarray(cache["pos"]), mask.sum(1))


def test_sharded_forward_equals_unsharded(hf_pair):
    assert jax.device_count() == 8
    d, _ = hf_pair
    m = load_pretrained(d)
    ids = jnp.asarray(_ids(m.config.vocab_size, (8, 12), seed=5))
    ref = np.asarray(m(ids))
    for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        mesh = make_mesh(shape)
        ms = load_pretrained(d, mesh=mesh)
        wq = nnx.state(ms)["layers"]["wq"][...]
        assert len(wq.sharding.device_set) == 8
        f = nnx.jit(lambda mod, x: mod(x))
        x = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        out = np.asarray(f(ms, x))
        assert np.abs(out - ref).max() <= 1e-5, shape
    # shard_model on an already loaded model gives the same numbers
    shard_model(m, make_mesh((2, 1, 4)))
    assert np.abs(np.asarray(m(ids)) - ref).max() <= 1e-5


def test_bf16_params_close(hf_pair):
    d, tm = hf_pair
    m = load_pretrained(d, dtype="bfloat16")
    assert nnx.state(m)["embed"][...].dtype == jnp.bfloat16
    ids = _ids(m.config.vocab_size, (1, 9), seed=6)
    out = np.asarray(m(jnp.asarray(ids)))
    assert out.dtype == np.float32
    assert np.abs(out - torch_logits(tm, ids)).max() < 0.1


def test_compute_dtype_auto(tmp_path, monkeypatch):
    from softgrpo_jax.models import config as mc
    from softgrpo_jax.models.config import cpu_flags, resolve_compute_dtype

    for backend in ("gpu", "tpu"):
        assert resolve_compute_dtype("auto", backend=backend, flags=frozenset()) == "bfloat16"
    assert resolve_compute_dtype("auto", backend="cpu", flags=frozenset({"avx2", "fma"})) == "float32"
    for f in ("amx_bf16", "avx512_bf16"):
        assert resolve_compute_dtype("auto", backend="cpu", flags=frozenset({"avx2", f})) == "bfloat16"
    assert [resolve_compute_dtype(n, backend="cpu") for n in ("float32", "bfloat16", jnp.float16)] == [
        "float32", "bfloat16", "float16"]
    with pytest.raises(TypeError):
        resolve_compute_dtype("bfloat17")
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n"
                   "flags\t\t: other\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "fma"} and cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    # through the loaders (HF and orbax): what the host's CPU reports decides
    hf, orb = str(tmp_path / "hf"), str(tmp_path / "orbax")
    make_hf_model(hf, "llama", seed=3)
    save_pretrained(load_pretrained(hf), orb, format="orbax")
    for flags, want in ((frozenset({"avx2"}), jnp.float32), (frozenset({"avx2", "amx_bf16"}), jnp.bfloat16)):
        monkeypatch.setattr(mc, "cpu_flags", lambda flags=flags: flags)
        for path in (hf, orb):
            m = load_pretrained(path, compute_dtype="auto")
            assert m.config.jnp_dtype == want and m.config.jnp_param_dtype == jnp.float32, (path, flags)


# ------------------------------------------------------------------------------------------- bad checkpoints
def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def test_bad_checkpoints(tmp_path):
    from softgrpo_jax.checkpoint import safetensors_io as st

    d = str(tmp_path / "m")
    make_hf_model(d, "qwen2")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pretrained(str(tmp_path / "nope"))
    tensors = dict(st.iter_tensors(os.path.join(d, "model.safetensors")))
    # missing tensor
    bad = str(tmp_path / "missing")
    os.makedirs(bad)
    json.dump(json.load(open(os.path.join(d, "config.json"))), open(os.path.join(bad, "config.json"), "w"))
    st.write_file(os.path.join(bad, "model.safetensors"),
                  {k: np.array(v) for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(bad)
    # extra tensor
    st.write_file(os.path.join(bad, "model.safetensors"),
                  {**{k: np.array(v) for k, v in tensors.items()}, "model.layers.0.foo.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.foo\.weight"):
        load_pretrained(bad)
    # mis-shaped tensor
    t2 = {k: np.array(v) for k, v in tensors.items()}
    t2["model.layers.2.self_attn.k_proj.weight"] = t2["model.layers.2.self_attn.k_proj.weight"][:, :-1].copy()
    st.write_file(os.path.join(bad, "model.safetensors"), t2)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*shape"):
        load_pretrained(bad)
    # config that does not match the weights
    _edit_config(d, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3"):
        load_pretrained(d)
    _edit_config(d, num_hidden_layers=3, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        load_pretrained(d)


def test_sharded_index_and_atomic_save(tmp_path):
    import torch
    import transformers

    d = str(tmp_path / "m")
    tm = make_hf_model(d, "llama", tie_word_embeddings=False)
    m = load_pretrained(d)
    out = str(tmp_path / "sharded")
    save_pretrained(m, out, max_shard_bytes=20_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    re = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(m.config.vocab_size, (1, 7))
    assert np.abs(torch_logits(re, ids) - torch_logits(tm, ids)).max() == 0
    m2 = load_pretrained(out)
    assert np.array_equal(np.asarray(m2(jnp.asarray(ids))), np.asarray(m(jnp.asarray(ids))))
    # a save that fails half-way leaves the previous export intact and no temp dirs behind
    before = sorted(os.listdir(out))

    class Boom:
        def save_pretrained(self, path):
            open(os.path.join(path, "tokenizer.json"), "w").write("{")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(m, out, tokenizer=Boom())
    assert sorted(os.listdir(out)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ------------------------------------------------------------------------------------ bf16 training gradients
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("n,d,f", [(24, 48, 80), (13, 40, 96), (16, 12, 20), (32, 96, 40)])
def test_bf16_matmul_gradients(n, d, f, transpose_w):
    """The mixed-precision matmul's hand-written backward against float64 NumPy: the weight gradient from bf16
    operands with float32 accumulation (unrounded, in the weight's float32), the input gradient in bf16. Token
    counts that are not multiples of 8 (padded), widths too narrow for tiles (the plain path) and an output
    narrower than the input (the weight gradient as (g.T @ x).T) included."""
    from softgrpo_jax.models.transformer import matmul

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


@pytest.mark.parametrize("block", [None, (16, 7)])
def test_logits_at_ids_and_vocab_logprobs(hf_pair, block, monkeypatch):
    """The soft path's K-id logits and the discrete path's chunked vocabulary log-probs against the full logits
    (``logits_from_hidden``), values and gradients (to the hidden states and every weight), tied and untied heads,
    with chunks of 1, 5 (ragged) and the default size, and a mask with no needed position; with the whole
    vocabulary as one block, and in blocks of 7 columns (``VOCAB_BLOCK``: many blocks, the last one ragged)."""
    from softgrpo_jax.models import transformer as T
    from softgrpo_jax.models.transformer import logits_from_hidden, logits_at_ids, vocab_logprobs

    monkeypatch.setattr(T, "VOCAB_BLOCK", block)
    d, _ = hf_pair
    m = load_pretrained(d)
    cfg, params = m.config, m.param_tree()
    V, D = cfg.vocab_size, cfg.hidden_size
    assert T._vocab_block(V) == (V if block is None else 7) and V % 7, V
    rng = np.random.RandomState(3)
    h = jnp.asarray(rng.randn(3, 11, D), jnp.float32)
    ids = jnp.asarray(rng.randint(0, V, (3, 11, 4)))
    tgt = jnp.asarray(rng.randint(0, V, (3, 11)))
    need = jnp.asarray(rng.rand(3, 11) < 0.4)
    assert 0 < int(need.sum()) < need.size
    c1, c2 = (jnp.asarray(rng.randn(*s), jnp.float32) for s in ((3, 11), (3, 11, 4)))
    temp = 0.7

    def reference(params, h):
        logits = logits_from_hidden(cfg, params, h)
        lp = jax.nn.log_softmax(logits / temp, axis=-1)
        full = jnp.where(need, jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0], 0.0)
        return full, jnp.take_along_axis(logits, ids, axis=-1)

    def ours(params, h, chunk):
        return vocab_logprobs(cfg, params, h, tgt, need, temperature=temp, chunk_size=chunk), \
            logits_at_ids(cfg, params, h, ids)

    want = jax.jit(reference)(params, h)
    for chunk in (1, 5, None):
        got = jax.jit(ours, static_argnums=2)(params, h, chunk)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got[0])[~np.asarray(need)] == 0)

    def loss(fn):
        return lambda p, h: sum(jnp.sum(c * o) for c, o in zip((c1, c2), fn(p, h)))

    g_want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, h)
    g_got = jax.jit(jax.grad(loss(lambda p, h: ours(p, h, 5)), argnums=(0, 1)))(params, h)
    flat_w, flat_g = jax.tree.leaves(g_want), jax.tree.leaves(g_got)
    assert len(flat_w) == len(flat_g)
    for a, b in zip(flat_g, flat_w):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * max(1.0, np.abs(b).max()))
    # nothing needed: zeros, no gradient from the vocabulary path
    none = jnp.zeros_like(need)
    z, gz = jax.jit(jax.value_and_grad(lambda p, h: jnp.sum(c1 * vocab_logprobs(cfg, p, h, tgt, none)),
                                       argnums=(0, 1)))(params, h)
    assert float(z) == 0 and all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(gz))


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
    from softgrpo_jax.models.transformer import swiglu

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
    """``_swiglu_mlp`` (the MLP over token tiles, backward recomputing gate and up per tile, weight gradients
    accumulated over tiles) against float64 NumPy (value and all four gradients, within bf16 rounding), and against
    the plain path (three ``_dense`` and ``swiglu``): the same value and weight gradients to float32 summation order,
    h's gradient within one bf16 rounding; random inputs, several tiles and one."""
    from softgrpo_jax.models import transformer as T

    rng = np.random.RandomState(n)
    D, F = 24, 40
    h = jnp.asarray(rng.randn(n, D), jnp.bfloat16)
    wg, wu, wd = (jnp.asarray(rng.randn(*s) * 0.3, jnp.float32) for s in ((D, F), (D, F), (F, D)))
    c = jnp.asarray(rng.randn(n, D), jnp.bfloat16)

    def run(f):
        y, vjp = jax.vjp(f, h, wg, wu, wd)
        return (y,) + vjp(c)

    tiled = jax.jit(lambda *a: run(lambda *x: T._swiglu_mlp(*x, rows)))()
    plain = jax.jit(lambda: run(lambda h, wg, wu, wd: T._dense(T.swiglu(T._dense(h, wg), T._dense(h, wu)), wd)))()
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


def test_mlp_tile_rows(monkeypatch):
    """Which token tiles the tiled MLP takes: bf16 on single-device XLA:CPU only, the largest multiple of 8 up to
    ``MLP_TILE_ROWS`` dividing the token count, one tile for few tokens or no such divisor, off at 0."""
    from softgrpo_jax.models import transformer as T

    def rows(n, dt=jnp.bfloat16):
        return T._mlp_tile_rows(jnp.zeros((1, n, 8), dt))

    assert T.MLP_TILE_ROWS == 512
    assert (rows(4096), rows(3072), rows(1000), rows(300), rows(4100), rows(4096, jnp.float32)) == (
        512, 512, 200, 300, 4100, 0)
    monkeypatch.setattr(T, "MLP_TILE_ROWS", 0)
    assert rows(4096) == 0


@pytest.mark.parametrize("remat", [False, True])
def test_tiled_mlp_model_gradients(remat, monkeypatch):
    """A bf16 model on XLA:CPU with the MLP forced into several token tiles per layer (``MLP_TILE_ROWS`` = 8 over
    2 x 16 tokens) against the plain MLP path: the same logits, parameter gradients within bf16 rounding."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models import transformer as T

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16", remat=remat)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(6)))
    ids = jnp.asarray(_ids(64, (2, 16), seed=8))

    def run():
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids)
            return jax.nn.log_softmax(logits, -1)[..., 5].sum(), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    monkeypatch.setattr(T, "MLP_TILE_ROWS", 8)
    assert T._mlp_tile_rows(jnp.zeros((2, 16, 32), jnp.bfloat16)) == 8
    (_, logits_t), g_t = run()
    monkeypatch.setattr(T, "MLP_TILE_ROWS", 0)
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
    from softgrpo_jax.models.transformer import matmul

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
def test_attention_core_gradients(dtype, T, tol, tiles, monkeypatch):
    """The attention core's written-out backward (delta = rowsum(dO * O), dK^T = Q^T dS, dV^T = dO^T W) against
    float64 NumPy on random GQA inputs with causal + padding masks (a fully masked query row included); untiled,
    and tiled (``tiles``: batch rows per tile, query positions per causal tile) as on XLA:CPU at training sizes."""
    from softgrpo_jax.models import transformer as TR
    from softgrpo_jax.models.transformer import _attention_core

    if tiles is not None:
        monkeypatch.setattr(TR, "_attention_tiles", lambda *a: tiles)

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
        return _attention_core(qg, kt, vt, jnp.asarray(mask), scale, False, tiles is not None)

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
def test_attention_block_against_numpy(tiles, bias, monkeypatch):
    """``_attention_block`` (projections, RoPE and GQA attention from a layer's normed input, flash-style backward
    recomputing everything from the input and the saved output and log-sum-exp) against float64 NumPy: output and
    the gradients of the input, the three weights and biases, on random bf16 inputs with a causal + left-padding
    mask; untiled, and over batch-row and causal query tiles. Rows with no visible key get no cotangent, as in
    training (their output is the mean of their tile's values)."""
    from softgrpo_jax.models import transformer as TR

    if tiles is not None:
        monkeypatch.setattr(TR, "_attention_tiles", lambda *a: tiles)
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
    block = jax.jit(lambda *a: TR._attention_block(*a, f32(cos), f32(sin), jnp.asarray(mask),
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
def test_attention_block_model_gradients(remat, monkeypatch):
    """A bf16 Qwen2 (query / key / value biases) on XLA:CPU with ``_attention_block`` forced into tiles of one
    batch row and 8 query positions against the plain attention path (``ATTENTION_BLOCK`` off): the same logits at
    real positions (to float32 summation order), parameter gradients within bf16 rounding, with and without remat;
    left padding in one row."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models import transformer as T

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

    monkeypatch.setattr(T, "_attention_tiles", lambda *a: (1, 8))
    assert T._attention_block_on(jnp.zeros((1, 8), jnp.bfloat16))
    (_, logits_b), g_b = run()
    monkeypatch.setattr(T, "ATTENTION_BLOCK", False)
    assert not T._attention_block_on(jnp.zeros((1, 8), jnp.bfloat16))
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
    from softgrpo_jax.models.transformer import _attention_tiles

    row = 3 * 768 * 256 * 4  # Hkv * G*T * S float32 scores of one batch row
    assert _attention_tiles(16, 256, 256, row, True) == (2, 64)
    assert _attention_tiles(16, 256, 256, row, False) == (2, 256)
    assert _attention_tiles(4, 32, 32, 3 * 96 * 32 * 4, True) == (4, 32)  # small: one tile
    assert _attention_tiles(5, 192, 192, 4 << 20, True) == (1, 64)  # 5 rows: tiles of one


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
def test_bf16_layer_scan_saves_residuals_as_bits(remat, monkeypatch):
    """A bf16 layer scan on XLA:CPU stacks its backward residuals as uint16 bits, never as bf16 (XLA:CPU computes a
    bf16 dynamic-update-slice in float32: the no-remat SmolLM2 update took 24 s instead of 10), with no weight
    copies among them; the gradients equal those of the same scan saving bf16 residuals (within bf16 rounding
    without remat, where the marks force roundings XLA may otherwise skip), on random weights."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models import transformer as T

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
    monkeypatch.setattr(T, "RESIDUALS_AS_BITS", False)
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


def test_float32_scan_saves_only_weight_gemm_outputs(monkeypatch):
    """A float32 layer scan on XLA:CPU without remat stacks only its weight GEMMs' outputs (and the carry) for the
    backward (norms, RoPE, SwiGLU and attention recomputed): fewer stacked residuals than a plain backward saves,
    less temporary memory, and the same gradients, on random weights with padding."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models import transformer as T

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
    monkeypatch.setattr(T, "SAVE_ONLY_DOTS_F32", False)
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


@pytest.mark.parametrize("remat", [False, True])
def test_bf16_training_gradients_close(hf_pair, remat):
    """Gradients of a bf16-compute model (float32 master weights) stay within bf16 rounding of float32's, for every
    parameter, tied or untied LM head, scanned layers with and without rematerialisation."""
    d, _ = hf_pair
    m32 = load_pretrained(d)
    m16 = load_pretrained(d, compute_dtype="bfloat16", remat=remat)
    ids = jnp.asarray(_ids(m32.config.vocab_size, (2, 12), seed=9))

    def grads(m):
        graphdef, params = nnx.split(m)

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids)
            lp = jax.nn.log_softmax(logits[:, :-1], -1)
            return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

        return jax.jit(jax.grad(loss))(params)

    g32, g16 = grads(m32), grads(m16)
    for path, a in jax.tree_util.tree_leaves_with_path(g32):
        b = dict(jax.tree_util.tree_leaves_with_path(g16))[path]
        assert b.dtype == jnp.float32
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
        assert rel < 0.05, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("remat", [False, True])
def test_fused_attention_path_equals_xla(hf_pair, monkeypatch, remat):
    """attention="cudnn" (rows reordered real-tokens-first, causal + padding-length attention through
    jax.nn.dot_product_attention) gives the XLA path's logits at real positions and the same parameter gradients,
    for left-padded, right-padded, holed and unpadded rows. On CPU the same call runs with XLA's implementation in
    place of cuDNN; benchmarks/bench_gpu_train.py checks cuDNN itself against the XLA path on a GPU."""
    import softgrpo_jax.models.transformer as T

    monkeypatch.setattr(T, "_DPA_IMPLEMENTATION", "xla")
    d, _ = hf_pair
    m_x = load_pretrained(d, remat=remat, attention="xla")
    m_c = load_pretrained(d, remat=remat, attention="cudnn")
    assert T.resolve_attention(m_c.config) == "cudnn" and T.resolve_attention(m_x.config) == "xla"
    V = m_x.config.vocab_size
    ids = jnp.asarray(_ids(V, (4, 19), seed=11))
    mask = np.ones((4, 19), bool)
    mask[0, :5] = False  # left padding
    mask[1, 13:] = False  # right padding
    mask[2, :3] = mask[2, 15:] = False  # both (a prompt + response row)
    mask[2, 8] = False  # and a hole: the reordering is exact for any mask
    mask = jnp.asarray(mask)
    w = jnp.asarray(np.random.RandomState(3).standard_normal((4, 19, V)), jnp.float32) * mask[..., None]

    def run(m):
        graphdef, params = nnx.split(m)

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits, -1) * w), logits

        (l, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, g

    lx, gx = run(m_x)
    lc, gc = run(m_c)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(lc)[real], np.asarray(lx)[real], atol=2e-4, rtol=2e-4)
    assert np.isfinite(np.asarray(lc)).all()
    for path, a in jax.tree_util.tree_leaves_with_path(gx):
        b = np.asarray(dict(jax.tree_util.tree_leaves_with_path(gc))[path], np.float64)
        a = np.asarray(a, np.float64)
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, atol=1e-5 + 1e-4 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))
    # unpadded rows (no mask: no reordering, causal only) and last_only
    np.testing.assert_allclose(np.asarray(m_c(ids)), np.asarray(m_x(ids)), atol=2e-4, rtol=2e-4)


def test_attention_option_validated():
    from softgrpo_jax.models import ModelConfig

    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4, attention="flash")
    import softgrpo_jax.models.transformer as T

    base = ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=8, dtype="bfloat16")
    assert jax.default_backend() == "cpu" and T.resolve_attention(base) == "xla"  # auto: cuDNN on NVIDIA GPUs only
    assert T.resolve_attention(base.replace(attention="cudnn")) == "cudnn"
