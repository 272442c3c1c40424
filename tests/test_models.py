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
    # an ISA cap in XLA_FLAGS makes the host count as the CPU it emulates
    zen4 = tmp_path / "zen4"
    zen4.write_text("flags\t\t: fpu avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 "
                    "amx_fp16\n")
    capped = {cap: cpu_flags(str(zen4), xla_flags=f"--xla_foo=1 --xla_cpu_max_isa={cap}")
              for cap in ("avx2", "AVX512", "AVX512_BF16", "AMX", "SSE4_2")}
    assert capped["avx2"] == {"fpu", "avx", "avx2", "fma", "f16c"}
    assert capped["AVX512"] == capped["avx2"] | {"avx512f", "avx512bw"}
    assert capped["AVX512_BF16"] == capped["AVX512"] | {"avx512_vnni", "avx512_bf16"}
    assert capped["AMX"] == capped["AVX512_BF16"] | {"amx_tile", "amx_bf16"} and capped["SSE4_2"] == {"fpu"}
    assert cpu_flags(str(zen4), xla_flags="--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AMX_FP16") == cpu_flags(
        str(zen4), xla_flags="") == cpu_flags(str(zen4), xla_flags="--xla_cpu_max_isa=bogus")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    assert resolve_compute_dtype("auto", backend="cpu", flags=cpu_flags(str(zen4))) == "float32"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX512_BF16")
    assert resolve_compute_dtype("auto", backend="cpu", flags=cpu_flags(str(zen4))) == "bfloat16"
    monkeypatch.delenv("XLA_FLAGS")
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


@pytest.mark.parametrize("block", [None, (16, 7)])
def test_logits_at_ids_and_vocab_logprobs(hf_pair, block):
    """The soft path's K-id logits and the discrete path's chunked vocabulary log-probs against the full logits
    (``logits_from_hidden``), values and gradients (to the hidden states and every weight), tied and untied heads,
    with chunks of 1, 5 (ragged) and the default size, and a mask with no needed position; with the whole
    vocabulary as one block, and in blocks of 7 columns (``Tuning.vocab_block``: many blocks, the last one ragged)."""
    from softgrpo_jax.models.transformer import logits_from_hidden, logits_at_ids, vocab_logprobs
    from softgrpo_jax.ops.tuning import set_tuning
    from softgrpo_jax.ops.vocab_logprobs import vocab_block

    set_tuning(vocab_block=block)  # (conftest restores the tuning after each test)
    d, _ = hf_pair
    m = load_pretrained(d)
    cfg, params = m.config, m.param_tree()
    V, D = cfg.vocab_size, cfg.hidden_size
    assert vocab_block(V) == (V if block is None else 7) and V % 7, V
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
def test_fused_attention_path_equals_xla(hf_pair, remat):
    """attention="cudnn" (rows reordered real-tokens-first, causal + padding-length attention through
    jax.nn.dot_product_attention) gives the XLA path's logits at real positions and the same parameter gradients,
    for left-padded, right-padded, holed and unpadded rows. On CPU the same call runs with XLA's implementation in
    place of cuDNN; benchmarks/bench_gpu_train.py checks cuDNN itself against the XLA path on a GPU."""
    import softgrpo_jax.models.transformer as T
    from softgrpo_jax.ops.tuning import set_tuning

    set_tuning(dpa_implementation="xla")  # (conftest restores the tuning after each test)
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
    assert T.resolve_attention(base.replace(attention="splash")) == "splash"  # auto picks it on TPU only


@pytest.mark.parametrize("layout", ["scan", "unrolled_remat", "per_layer"])
def test_shared_prompt_forward_equals_rows(layout):
    """``forward``'s shared prompt: prompts run once with ``return_kv``, responses continued over their gathered
    keys and values (``prefix``), give the hidden states and parameter gradients of each row with its prompt in
    front (float32, ragged prompts and responses, one prompt continued by two rows)."""
    from softgrpo_jax.models import ModelConfig, Transformer
    from softgrpo_jax.models.transformer import forward, unstack_layers

    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", remat=layout == "unrolled_remat",
                      scan_layers=layout != "unrolled_remat")
    params = Transformer(cfg, rngs=nnx.Rngs(3)).param_tree()
    if layout == "per_layer":
        params = unstack_layers(params)
    rng = np.random.default_rng(0)
    U, P, R, T = 2, 6, 3, 5
    pt, plen = rng.integers(0, 64, (U, P)), np.array([6, 4])
    pm = np.arange(P)[None] < plen[:, None]
    rt, rlen = rng.integers(0, 64, (R, T)), np.array([5, 3, 2])
    rm = np.arange(T)[None] < rlen[:, None]
    idx = np.array([1, 0, 1])
    full, fm = np.zeros((R, P + T), int), np.zeros((R, P + T), bool)  # each row: its prompt, then its response
    for r in range(R):
        n = plen[idx[r]]
        full[r, :n], full[r, n:n + rlen[r]], fm[r, :n + rlen[r]] = pt[idx[r], :n], rt[r, :rlen[r]], True
    w = jnp.asarray(rng.standard_normal((R, T, 32)), jnp.float32) * jnp.asarray(rm)[..., None]

    def rows(p):  # the responses' hidden states inside whole rows
        h = forward(cfg, p, jnp.asarray(full), attention_mask=jnp.asarray(fm), return_hidden=True)
        return jnp.stack([jax.lax.dynamic_slice_in_dim(jnp.pad(h[r], ((0, T), (0, 0))), int(plen[idx[r]]), T)
                          for r in range(R)])

    def shared(p):
        hp, (k, v) = forward(cfg, p, jnp.asarray(pt), attention_mask=jnp.asarray(pm), return_hidden=True,
                             return_kv=True)
        take = (lambda a: [x[idx] for x in a]) if layout == "per_layer" else (lambda a: a[:, idx])
        pos = plen[idx][:, None] + np.maximum(np.cumsum(rm, 1) - 1, 0)
        return forward(cfg, p, jnp.asarray(rt), attention_mask=jnp.asarray(rm), positions=jnp.asarray(pos),
                       prefix=(take(k), take(v), jnp.asarray(pm[idx])), return_hidden=True)

    np.testing.assert_allclose(np.asarray(shared(params) * (w != 0)), np.asarray(rows(params) * (w != 0)),
                               atol=2e-6, rtol=1e-5)
    g1 = jax.grad(lambda p: jnp.sum(rows(p) * w))(params)
    g2 = jax.grad(lambda p: jnp.sum(shared(p) * w))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1)):
        if np.abs(np.asarray(b)).max() > 0:
            assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-5 * np.linalg.norm(np.asarray(b)), \
                jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match="one of them per call"):
        forward(cfg, params, jnp.asarray(rt), prefix=(None, None, jnp.asarray(pm)), return_kv=True)
