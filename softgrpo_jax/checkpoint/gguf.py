"""llama.cpp ``.gguf`` import: metadata -> ModelConfig, tensors dequantised one by one -> Transformer.

Supported architectures: ``llama`` (Llama 2/3.x, SmolLM2) and ``qwen2`` (Qwen2/2.5, DeepSeek-R1-Distill-Qwen).
Tensors are read through the ``gguf`` package's memory-mapped reader and dequantised with ``gguf.quants.dequantize``
(F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants Q2_K..Q6_K, IQ* ...), one tensor at a time, then renamed to
Hugging Face names and handed to :func:`softgrpo_jax.checkpoint.hf.assemble`, which places each finished weight on its
sharding. Nothing here needs torch.

llama.cpp's converter permutes the rows of the q and k projections of ``llama`` models (to turn HF's rotate-half RoPE
into its interleaved one); :func:`unpermute_qk` undoes it, so the weights are bit-identical to what transformers' own
GGUF loader produces. ``qwen2`` files are not permuted.

Llama 3.1+ rope scaling is stored by llama.cpp as a ``rope_freqs.weight`` tensor of per-frequency divisors rather than
as metadata; :func:`_fit_llama3_scaling` recovers the ``llama3`` scaling parameters from it (and refuses to load a
file whose divisors fit no llama3 schedule).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Iterator

import numpy as np

from softgrpo_jax.checkpoint.hf import CheckpointError, assemble
from softgrpo_jax.models.config import ModelConfig, RopeScaling, UnsupportedModelError, resolve_compute_dtype

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (with "blk.N." stripped) -> HF name suffix
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ROPE_FREQS = "rope_freqs.weight"


def gguf_name_to_hf(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names -> None."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if idx.isdigit() and rest in _LAYER:
            return f"model.layers.{int(idx)}.{_LAYER[rest]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. ``w`` is [n_head * hd, ...] (a weight [out, in] or a bias [out])."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ reading
# GGUF value types (gguf.GGUFValueType): scalar struct formats; 8 = string, 9 = array.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NATIVE = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
           "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file. ``shape`` is GGUF order ([ne0, ne1, ...], innermost first); ``data`` is a
    read-only memory-mapped view (native dtype for F16/F32/..., else the raw uint8 blocks, rows x bytes)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """A minimal little-endian GGUF (v2/v3) reader: header and tensor index parsed with ``struct``, tensor data
    memory-mapped. ``gguf.GGUFReader`` builds a NumPy view per string and takes ~2-3 s on a 49k-token vocabulary; this
    takes ~0.1 s. String arrays (the vocabulary, BPE merges) are decoded only when read from ``fields``."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        self._buf = buf
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version & 0xFFFF == 0:
            raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3 expected); "
                                  "re-convert it with a recent llama.cpp")
        off = 24
        self._raw: dict[str, tuple[int, int]] = {}  # key -> (value type, value offset)
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = self._str(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            self._raw[key] = (vtype, off)
            off = self._skip(vtype, off)
        infos = []
        for _ in range(n_tensors):
            name, off = self._str(off)
            (nd,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{nd}Q", buf, off + 4)
            qtype, toff = struct.unpack_from("<IQ", buf, off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            infos.append((name, dims, qtype, toff))
        align = int(self.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = off + (-off) % align
        self.tensors: list[GGUFTensor] = []
        seen = set()
        for name, dims, qtype, toff in infos:
            if name in seen:
                raise CheckpointError(f"{path}: tensor {name!r} appears twice")
            seen.add(name)
            try:
                qt = gguf.GGMLQuantizationType(qtype)
            except ValueError:
                raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {qtype}; "
                                      "upgrade the gguf package") from None
            n = int(np.prod(dims))
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            nbytes = n * ts // bs
            np_shape = tuple(reversed(dims))
            lo = start + toff
            if lo + nbytes > len(self._mm):
                raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file (truncated download?)")
            raw = self._mm[lo:lo + nbytes]
            if qt.name in _NATIVE:
                data = raw.view(_NATIVE[qt.name]).reshape(np_shape)
            else:
                data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(np_shape, qt))
            self.tensors.append(GGUFTensor(name, qt, tuple(int(d) for d in dims), data))

    # -- low-level
    def _str(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, off)
        return bytes(self._buf[off + 8:off + 8 + n]).decode("utf-8", errors="replace"), off + 8 + n

    def _skip(self, vtype: int, off: int) -> int:
        if vtype in _SCALAR_FMT:
            return off + struct.calcsize(_SCALAR_FMT[vtype])
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", self._buf, off)
            return off + 8 + n
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", self._buf, off)
            off += 12
            if etype in _SCALAR_FMT:
                return off + count * struct.calcsize(_SCALAR_FMT[etype])
            for _ in range(count):
                off = self._skip(etype, off)
            return off
        raise CheckpointError(f"{self.path}: corrupt GGUF metadata (value type {vtype})")

    def _value(self, vtype: int, off: int):
        if vtype in _SCALAR_FMT:
            return struct.unpack_from(_SCALAR_FMT[vtype], self._buf, off)[0]
        if vtype == 8:
            return self._str(off)[0]
        etype, count = struct.unpack_from("<IQ", self._buf, off)
        off += 12
        if etype in _SCALAR_FMT:
            return list(struct.unpack_from(f"<{count}{_SCALAR_FMT[etype][1:]}", self._buf, off))
        out = []
        for _ in range(count):
            out.append(self._value(etype, off))
            off = self._skip(etype, off)
        return out

    # -- public
    def keys(self):
        return self._raw.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def get(self, key: str, default=None):
        """The value of metadata ``key`` (str, int, float, bool or list), decoded on first use."""
        if key not in self._raw:
            return default
        if key not in self.fields:
            self.fields[key] = self._value(*self._raw[key])
        return self.fields[key]

    def array_len(self, key: str) -> int | None:
        """Length of an array-valued key without decoding it."""
        if key not in self._raw or self._raw[key][0] != 9:
            return None
        return struct.unpack_from("<IQ", self._buf, self._raw[key][1])[1]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file, with errors that name the file and the fix."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; pass the .gguf file itself (or use load_hf for a "
                              "Hugging Face directory)")
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); pass a llama.cpp "
                              ".gguf file, or a Hugging Face directory to load_hf")
    try:
        return GGUFFile(path)
    except CheckpointError:
        raise
    except Exception as e:  # truncated header, ...
        raise CheckpointError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e}); is it complete and "
                              "written by a recent llama.cpp?") from e


def _scalar(meta: GGUFFile, key: str, default=None, *, required: bool = False, path: str = ""):
    if key not in meta:
        if required:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    v = meta.get(key)
    if isinstance(v, list):  # per-layer arrays (e.g. head_count in some files): accept when uniform
        if len(set(v)) != 1:
            raise UnsupportedModelError(f"{path}: {key} varies per layer ({v}); only uniform layers are supported")
        v = v[0]
    return v


def _opt_int(v):
    return None if v is None else int(v)


def _fit_llama3_scaling(factors: np.ndarray, cfg_kw: dict, path: str) -> RopeScaling:
    """Recover llama3 rope-scaling parameters from llama.cpp's ``rope_freqs`` divisors [hd/2]."""
    from softgrpo_jax.models.transformer import inv_frequencies

    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    base = ModelConfig(**{**cfg_kw, "rope_scaling": None})
    tried = []
    for low, high, orig in [(1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 16384), (1.0, 4.0, 2048),
                            (1.0, 2.0, 8192), (2.0, 4.0, 8192)]:
        rs = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                         original_max_position_embeddings=orig)
        inv0 = np.asarray(inv_frequencies(base), np.float64)
        inv1 = np.asarray(inv_frequencies(base.replace(rope_scaling=rs)), np.float64)
        if np.allclose(inv0 / inv1, factors, rtol=1e-4, atol=1e-4):
            return rs
        tried.append((low, high, orig))
    raise UnsupportedModelError(
        f"{path}: rope_freqs.weight holds frequency divisors that fit no llama3 rope scaling "
        f"(factor={factor}, tried low/high/original={tried}); this rope scaling is not supported")


def config_from_gguf(reader: GGUFFile, path: str = "gguf", **overrides) -> ModelConfig:
    """Build a ModelConfig from a GGUF file's metadata (and its tensor list, for tying and the vocabulary)."""
    meta = reader
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}")
    a = arch + "."
    if _scalar(meta, a + "expert_count", 0, path=path):
        raise UnsupportedModelError(f"{path}: mixture-of-experts {arch} models (e.g. Mixtral) are not supported")
    tensors = {t.name: t for t in reader.tensors}
    D = int(_scalar(meta, a + "embedding_length", required=True, path=path))
    H = int(_scalar(meta, a + "attention.head_count", required=True, path=path))
    Hkv = int(_scalar(meta, a + "attention.head_count_kv", H, path=path))
    hd = int(_scalar(meta, a + "attention.key_length", D // H, path=path))
    rot = _scalar(meta, a + "rope.dimension_count", hd, path=path)
    if int(rot) != hd:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count={rot} < head_dim={hd})"
                                    " are not supported")
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes are [ne0=D, ne1=V]
    elif "tokenizer.ggml.tokens" in meta:
        vocab = meta.array_len("tokenizer.ggml.tokens")
    else:
        vocab = int(_scalar(meta, a + "vocab_size", required=True, path=path))
    scaling_type = _scalar(meta, a + "rope.scaling.type", None, path=path)
    if scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"{path}: rope scaling type {scaling_type!r} is not supported (only llama3)")
    eos = _scalar(meta, "tokenizer.ggml.eos_token_id", None, path=path)
    kw: dict[str, Any] = dict(
        family=arch,
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=int(_scalar(meta, a + "feed_forward_length", required=True, path=path)),
        num_layers=int(_scalar(meta, a + "block_count", required=True, path=path)),
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=hd,
        rope_theta=float(_scalar(meta, a + "rope.freq_base", 10000.0, path=path)),
        rms_norm_eps=float(_scalar(meta, a + "attention.layer_norm_rms_epsilon", 1e-6, path=path)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        max_position_embeddings=int(_scalar(meta, a + "context_length", 32768, path=path)),
        bos_token_id=_opt_int(_scalar(meta, "tokenizer.ggml.bos_token_id", None, path=path)),
        eos_token_id=() if eos is None else (int(eos),),
        pad_token_id=_opt_int(_scalar(meta, "tokenizer.ggml.padding_token_id", None, path=path)),
    )
    if _ROPE_FREQS in tensors:
        t = tensors[_ROPE_FREQS]
        kw["rope_scaling"] = _fit_llama3_scaling(_dequantize(t, path), kw, path)
    kw.update(overrides)
    return ModelConfig(**kw)


def _dequantize(t, path: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize

    try:
        return dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} is stored as {GGMLQuantizationType(t.tensor_type).name}, "
                              "which this gguf package cannot dequantise; upgrade gguf or re-quantise the file") from e


def iter_gguf_tensors(reader: GGUFFile, cfg: ModelConfig, path: str = "gguf") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) per tensor, dequantised one at a time.

    Unknown GGUF tensors are yielded under their own name, so ``assemble`` reports them as unexpected.
    """
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # consumed by config_from_gguf
        hf_name = gguf_name_to_hf(t.name)
        if hf_name is None:
            yield t.name, np.zeros(0, np.float32)
            continue
        w = _dequantize(t, path)
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        if cfg.family == "llama":
            if ".attn_q." in t.name:
                w = unpermute_qk(w, cfg.num_heads)
            elif ".attn_k." in t.name:
                w = unpermute_qk(w, cfg.num_kv_heads)
        yield hf_name, w


def load_gguf(path: str | os.PathLike, *, dtype=None, compute_dtype=None, mesh=None, **overrides):
    """Load a llama.cpp ``.gguf`` file (architectures ``llama`` and ``qwen2``) into a :class:`Transformer`.

    ``dtype`` is the parameter dtype (default float32, whatever the file's quantisation); ``compute_dtype`` the
    activation dtype (default: the parameter dtype). ``mesh`` places each weight on its sharding as it is built.
    Other keyword arguments override ModelConfig fields (e.g. ``scan_layers=False``).
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = gguf_model_config(path, dtype=dtype, compute_dtype=compute_dtype, reader=reader, **overrides)
    return assemble(cfg, iter_gguf_tensors(reader, cfg, path), mesh=mesh, source=path)


def gguf_model_config(path: str | os.PathLike, *, dtype=None, compute_dtype=None, reader: GGUFFile | None = None,
                      **overrides) -> ModelConfig:
    """The ModelConfig ``load_gguf`` builds for ``path``, from the file's metadata alone."""
    path = os.fspath(path)
    if dtype is not None:
        overrides["param_dtype"] = str(np.dtype(dtype))
    overrides.setdefault("dtype", resolve_compute_dtype(compute_dtype) if compute_dtype is not None
                         else overrides.get("param_dtype", "float32"))
    return config_from_gguf(reader if reader is not None else open_gguf(path), path, **overrides)


def gguf_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer (with the chat template) rebuilt from the GGUF's ``tokenizer.ggml.*`` metadata.

    Works offline: everything comes from the file.
    """
    path = os.path.abspath(os.fspath(path))
    reader = open_gguf(path)  # validates path and magic with clear errors
    meta = reader
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens is missing); "
                              "load the tokenizer from the original Hugging Face repository instead")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: transformers could not build a tokenizer from this GGUF file "
                              f"({type(e).__name__}: {e})") from e
    tmpl = meta.get("tokenizer.chat_template")
    if tmpl and not getattr(tok, "chat_template", None):
        tok.chat_template = tmpl
    return tok
