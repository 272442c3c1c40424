"""Tiny random checkpoints written by transformers itself (the independent reference)."""

from __future__ import annotations

import numpy as np

# LLVM's optimisation of the machine code XLA:CPU emits, off in test processes: the tests' programs are many and
# tiny, so compiling, not running, is what they spend their time on, and level 0 compiles them ~1.5x faster (their
# results stay within the tests' tolerances). Processes that run the real SmolLM2 as a user does (the demo smoke, the
# notebook, the comparison) keep XLA's default, under which they run faster.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or one it starts) with ``devices`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


QWEN2 = dict(family="qwen2", vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
LLAMA = dict(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)


def make_hf_model(path: str, family: str = "qwen2", seed: int = 0, **kw):
    """Write a tiny random transformers checkpoint to ``path`` and return the (float32, eval) torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    base = dict(QWEN2 if family == "qwen2" else LLAMA)
    base.pop("family")
    base.update(kw)
    base.setdefault("max_position_embeddings", 256)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**base)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**base)
        model = transformers.LlamaForCausalLM(cfg)
    # the default init leaves biases zero and norms one; randomise everything so parity is meaningful
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(attention_mask)
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def make_tiny_smollm_dir(path: str, seed: int = 0, **kw) -> str:
    """A tiny random Llama that uses SmolLM2's real tokenizer (from the embedded GGUF): fast end-to-end runs with real
    text, chat template and </think> handling."""
    from softgrpo_jax import load_tokenizer

    tok = load_tokenizer("smollm2")
    base = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base.update(kw)
    make_hf_model(path, "llama", seed=seed, **base)
    tok.save_pretrained(path)
    return path


def expect_ynn(mode: str) -> bool:
    """Whether a program compiled under ``$SOFTGRPO_YNN_DOTS=mode`` should hold YNNPACK fusions on this jaxlib: when
    its default uses them and either ``mode`` is "on" or the jaxlib lacks the option that turns them off (then it
    keeps its default under both settings). A jaxlib without YNNPACK: never."""
    import jax
    import jax.numpy as jnp

    from softgrpo_jax.xla_options import YNN_OPTION, option_supported

    a = jnp.ones((64, 64), jnp.float32)
    default = "ynn_fusion" in jax.jit(lambda x, y: x @ y).lower(a, a).compile().as_text()
    return default and (mode == "on" or not option_supported(YNN_OPTION, ""))
