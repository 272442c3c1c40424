"""Model configuration shared by every supported family.

A family (Qwen2, Llama) is this config plus a weight-name map (``softgrpo_jax.checkpoint.hf``); there is one
transformer implementation (``softgrpo_jax.models.transformer``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture or a feature this port does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")

# CPU flags (Linux /proc/cpuinfo) of x86 units that compute in bf16: AMX tiles and AVX512-BF16's dot products.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

# XLA:CPU's ISA levels (``--xla_cpu_max_isa``), oldest first, and the /proc/cpuinfo flags each one adds. A host run
# under a cap is treated as the older CPU it emulates: no flag above the cap counts (the compute dtype "auto", the
# YNNPACK dot choice), so a capped run takes the code paths that CPU would take.
_XLA_ISA_LEVELS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16")
_FLAGS_ABOVE = {  # level -> the flags that appear only above it ("x*": every flag starting with x)
    "AVX512_BF16": ("avx512_fp16", "amx*"),
    "AMX": ("amx_fp16", "amx_complex"),
}
_FLAGS_ABOVE["AVX512_VNNI"] = _FLAGS_ABOVE["AVX512_BF16"] + ("avx512_bf16",)
_FLAGS_ABOVE["AVX512"] = _FLAGS_ABOVE["AVX512_VNNI"] + ("avx512_vnni", "avx_vnni*")
_FLAGS_ABOVE["AVX2"] = _FLAGS_ABOVE["AVX512"] + ("avx512*",)
_FLAGS_ABOVE["AVX"] = _FLAGS_ABOVE["AVX2"] + ("avx2", "fma")
_FLAGS_ABOVE["SSE4_2"] = _FLAGS_ABOVE["AVX"] + ("avx", "f16c")


def xla_cpu_max_isa(xla_flags: str | None = None) -> str | None:
    """The ISA cap set with ``--xla_cpu_max_isa=...`` in ``XLA_FLAGS`` (upper case), or None."""
    import os

    value = None
    for tok in (os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags).split():
        if tok.startswith("--xla_cpu_max_isa="):
            value = tok.split("=", 1)[1].strip().upper() or None  # the last one wins, as in XLA's flag parser
    return value if value in _XLA_ISA_LEVELS else None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo", *, xla_flags: str | None = None) -> frozenset[str]:
    """The first processor's feature flags from ``/proc/cpuinfo`` (empty where there is none: macOS, Windows),
    without those above ``--xla_cpu_max_isa`` when ``XLA_FLAGS`` caps the ISA."""
    flags = frozenset()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = xla_cpu_max_isa(xla_flags)
    if cap is None or cap not in _FLAGS_ABOVE:
        return flags
    above = _FLAGS_ABOVE[cap]
    return frozenset(f for f in flags if not any(f.startswith(a[:-1]) if a.endswith("*") else f == a
                                                 for a in above))


def resolve_compute_dtype(name, *, backend: str | None = None, flags: frozenset[str] | None = None) -> str:
    """A compute dtype's canonical name; ``"auto"``: bfloat16 on accelerators and on CPUs with bf16 units (AMX-BF16,
    AVX512-BF16), float32 on other CPUs.

    XLA:CPU without bf16 units converts every bf16 operand to float32 and rounds after each op: on a 2-core AMD EPYC
    (AVX2) the SmolLM2 SofT-GRPO update ran 1.6x slower in bf16 (with remat) than in float32 and Gumbel decoding
    1.1x slower (benchmarks/RESULTS.md), where on a Xeon with AMX bf16 is the faster one."""
    if str(name) != "auto":
        return str(np.dtype(jnp.dtype(name)))
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if NATIVE_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. ``param_dtype`` stores weights, ``dtype`` is the compute dtype.

    Softmax, RMSNorm statistics, RoPE tables and the returned logits are always float32.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    # attention over a whole sequence (training, log-probs; not cached decoding): "xla" (batched GEMMs + softmax,
    # the [B, H, T, S] scores materialised), "cudnn" (cuDNN flash attention through jax.nn.dot_product_attention;
    # 16-bit compute dtypes on NVIDIA GPUs), "splash" (JAX's splash attention kernel: TPU; interpret mode elsewhere),
    # "auto" (splash on TPU, cudnn where it applies, else xla).
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.family not in MODEL_TYPES:
            raise UnsupportedModelError(f"unknown model family {self.family!r}; supported: {sorted(MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- HF config.json <-> ModelConfig
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        family = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                family = SUPPORTED_ARCHITECTURES[a]
        if family is None and model_type in MODEL_TYPES and not archs:
            family = model_type
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        if family == "qwen2" and hf.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 use_sliding_window=True is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rs = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rs = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (only llama3)")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        heads = int(hf["num_attention_heads"])
        cfg = dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rope_theta=float(theta),
            rope_scaling=rs,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family == "llama" and bool(hf.get("attention_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        cfg.update(overrides)
        return cls(**cfg)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers loads into the matching PyTorch class."""
        arch = MODEL_TYPES[self.family]
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_params = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                           **dataclasses.asdict(self.rope_scaling)}
            hf["rope_scaling"] = dict(rope_params)
        hf["rope_parameters"] = rope_params
        if self.family == "llama":
            hf["attention_bias"] = self.o_bias or self.qkv_bias
            hf["mlp_bias"] = False
        else:
            hf["use_sliding_window"] = False
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            hf["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0]
        if self.pad_token_id is not None:
            hf["pad_token_id"] = self.pad_token_id
        return hf

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per = D * q + 2 * D * kv + q * D + 3 * D * F + 2 * D
        per += (q + 2 * kv) * self.qkv_bias + D * self.o_bias
        return L * per + V * D * (1 if self.tie_word_embeddings else 2) + D
