"""ml-collections configuration: the full tree with defaults, command-line overrides, and typed views.

Every experiment file in ``configs/`` starts from :func:`base_config` and changes what differs. Overrides
``--config.a.b=value`` are type-checked against the existing field; an unknown or mistyped key fails with the valid
keys listed (and the closest matches).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import ConfigDict, FieldReference


class ConfigError(ValueError):
    pass


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "run"
    c.model = ConfigDict(dict(
        path="smollm2",  # HF dir, .gguf file, orbax checkpoint, or "smollm2" (the embedded default)
        param_dtype="float32",  # master weights (optimizer state follows)
        compute_dtype="float32",  # activations: "bfloat16" on accelerators; "auto": bfloat16 on accelerators and
        #                           on CPUs with bf16 units (AMX-BF16, AVX512-BF16), float32 on other CPUs
        scan_layers=True,
        remat=False,
        attention="auto",  # auto (cuDNN flash attention for bf16 on NVIDIA GPUs, else XLA) | xla | cudnn
    ))
    c.ref_model = ConfigDict(dict(path=""))  # "" = a frozen copy of the initial policy
    c.data = ConfigDict(dict(
        train="reasoning_gym_math",  # TFDS builder name (softgrpo_jax.data)
        train_split="train",
        eval=("reasoning_gym_math:test",),  # "name:split" entries evaluated by `eval` and before/after training
        data_dir="",  # TFDS data dir ("" = default)
        manual_dir="",  # where user-supplied files live ("" = <data_dir>/downloads/manual)
        prompt_style="auto",  # auto | r1 (template opens <think>) | think_tags (SmolLM2-style instruction) | plain
        max_prompt_length=1024,
        shuffle=True,
        eval_limit=0,  # 0 = all problems of each eval split
        reasoning_gym=ConfigDict(dict(tasks="", train_size=8192, test_size=512, seed=1234)),
    ))
    c.rollout = ConfigDict(dict(
        mode="gumbel",  # gumbel (SofT-GRPO) | soft | discrete (GRPO baseline)
        max_topk=5,
        temperature=1.0,
        top_k=5,
        top_p=0.95,
        min_p=0.0,
        after_thinking_temperature=1.0,
        after_thinking_top_k=5,
        after_thinking_top_p=0.95,
        after_thinking_min_p=0.0,
        faithful_temperature=False,
        tau=0.1,
        noise="gumbel",
        noise_factor=1.0,
        think_end="</think>",
        think_end_match="full",
        early_stopping_entropy_threshold=0.0,
        early_stopping_length_threshold=256,
        max_new_tokens=8192,
        embed_impl="auto",
        dtype="",  # weights + activations while decoding; "" = model.compute_dtype ("bfloat16": bf16 rollouts and
        #            evals of a float32 policy, as the original's sglang rollouts; 1.8x faster decoding on this CPU)
        layout="auto",  # auto | scan | per_layer: how the decoder runs its layers (auto: per_layer on CPU and GPU)
    ))
    c.rl = ConfigDict(dict(
        algorithm="softgrpo",  # softgrpo | grpo (the baseline: discrete rollouts, same trainer)
        group_size=8,
        train_batch_size=64,  # prompts per step
        mini_batch_size=32,  # prompts per optimiser update
        micro_batch_size=2,  # sequences per forward/backward (gradient accumulation inside one jitted update)
        ppo_epochs=1,
        old_logprobs="auto",  # auto | recompute: the rollout policy's log-probs (PPO ratio denominator). auto: when
        #   a step makes a single update (one mini-batch, one epoch) they equal the current policy's, taken under
        #   stop_gradient inside the update instead of a separate forward pass (ratio 1, as recomputing gives up to
        #   rounding); recompute: always a separate pass before the updates, as verl does
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        clip_ratio_c=3.0,
        use_kl_loss=True,
        kl_coef=0.001,
        kl_type="low_var_kl",
        loss_agg_mode="token-mean",
        train_temperature=1.0,
        logprob_chunk_size=0,  # rows of vocabulary-wide logits per chunk (discrete targets only); 0 = ~128 MB
        # of float32 logits (single-device XLA:CPU: 1024 rows, in blocks of vocabulary columns)
        discrete_from_ids=False,
    ))
    c.optim = ConfigDict(dict(
        lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
        schedule="constant",  # constant | warmup_cosine | warmup_constant
        warmup_steps=0, min_lr_ratio=0.0,
    ))
    c.reward = ConfigDict(dict(
        mode="math_verify", timeout_s=5.0, workers=0,
        on_truncation="score",  # score (as the seed) | zero: a response that used the whole token budget without
        #   a stop token gets reward 0 in training (evaluation scores every response as it is)
    ))
    c.trainer = ConfigDict(dict(
        output_dir="runs/run",
        total_steps=0,  # 0 = one epoch over the training split
        seed=0,
        save_every=200,
        keep_checkpoints=2,
        eval_every=0,  # 0 = only before and after training
        eval_before=True,
        export_hf=True,
        mesh=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
        log_every=1,
        tensorboard=True,
        progress=True,
        compilation_cache="auto",  # JAX's persistent compilation cache, so a resumed or repeated run skips most
        #   compiling: auto = $SOFTGRPO_COMPILATION_CACHE if set, else the project cache folder's jax/ (see
        #   checkpoint.embedded.cache_dir); or a folder; "" or "off" = no cache
    ))
    c.eval = ConfigDict(dict(
        n_samples=32,
        ks=(1, 2, 4, 8, 16, 32),
        batch_size=64,  # rows per generate call
        max_new_tokens=32768,
        scorer="math_verify_eval",  # the evaluation scorer of SPEC.md 5
        mode="gumbel",
        temperature=1.0, top_k=5, top_p=0.95, max_topk=5, tau=0.1, noise_factor=1.0,
        seed=0,
    ))
    return c


# ------------------------------------------------------------------------------------------------------- loading
def load_config_file(path: str) -> ConfigDict:
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        alt = os.path.join(here, os.path.basename(path))
        if os.path.isfile(alt):
            path = alt
        else:
            avail = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
            raise ConfigError(f"config file {path!r} not found; available in configs/: {avail}")
    spec = importlib.util.spec_from_file_location("_softgrpo_config_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = mod.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def all_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, ConfigDict):
            out += all_keys(v, prefix + k + ".")
        else:
            out.append(prefix + k)
    return out


def _parse_value(text: str, current: Any, key: str):
    if isinstance(current, FieldReference):
        current = current.get()
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            v = tuple(s.strip() for s in text.split(",") if s.strip())
        if not isinstance(v, (tuple, list)):
            v = (v,)
        return tuple(v)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Apply ``a.b=value`` strings (with or without a leading ``--config.``)."""
    keys = all_keys(cfg)
    for item in overrides:
        s = item
        for pre in ("--config.", "config."):
            if s.startswith(pre):
                s = s[len(pre):]
        if "=" not in s:
            raise ConfigError(f"override {item!r} must look like --config.section.key=value")
        key, text = s.split("=", 1)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint}\nValid keys:\n  " + "\n  ".join(keys))
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = _parse_value(text, node[parts[-1]], key)
    return cfg


def get_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
    cfg = load_config_file(path)
    extra = set(all_keys(cfg)) - set(all_keys(base_config()))
    if extra:
        raise ConfigError(f"{path}: keys not in the base config: {sorted(extra)}")
    cfg = apply_overrides(cfg, overrides)
    cfg.lock()
    return cfg


# ------------------------------------------------------------------------------------------------------- views
def sampling_config(r: ConfigDict, *, max_new_tokens: int | None = None):
    from softgrpo_jax.sampling import SamplingConfig

    return SamplingConfig(
        mode=r.mode, max_topk=r.max_topk, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
        after_thinking_temperature=r.after_thinking_temperature, after_thinking_top_k=r.after_thinking_top_k,
        after_thinking_top_p=r.after_thinking_top_p, after_thinking_min_p=r.after_thinking_min_p,
        faithful_temperature=r.faithful_temperature, tau=r.tau, noise=r.noise, noise_factor=r.noise_factor,
        think_end_match=r.think_end_match, early_stopping_entropy_threshold=r.early_stopping_entropy_threshold,
        early_stopping_length_threshold=r.early_stopping_length_threshold,
        max_new_tokens=max_new_tokens or r.max_new_tokens)


def eval_sampling_config(e: ConfigDict, r: ConfigDict):
    from softgrpo_jax.sampling import SamplingConfig

    return SamplingConfig(
        mode=e.mode, max_topk=e.max_topk, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
        after_thinking_temperature=e.temperature, after_thinking_top_k=e.top_k, after_thinking_top_p=e.top_p,
        tau=e.tau, noise=r.noise, noise_factor=e.noise_factor, think_end_match=r.think_end_match,
        max_new_tokens=e.max_new_tokens)


def loss_config(rl: ConfigDict, noise: str = "gumbel"):
    from softgrpo_jax.rl.objective import LossConfig

    return LossConfig(
        clip_ratio_low=rl.clip_ratio_low, clip_ratio_high=rl.clip_ratio_high,
        clip_ratio_c=rl.clip_ratio_c if rl.clip_ratio_c > 0 else None, use_kl_loss=rl.use_kl_loss,
        kl_coef=rl.kl_coef, kl_type=rl.kl_type, loss_agg_mode=rl.loss_agg_mode, temperature=rl.train_temperature,
        noise=noise, discrete_from_ids=rl.discrete_from_ids,
        chunk_size=rl.logprob_chunk_size if rl.logprob_chunk_size > 0 else None)


def to_dict(cfg: ConfigDict) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


__all__ = ["base_config", "get_config", "apply_overrides", "load_config_file", "ConfigError", "sampling_config",
           "eval_sampling_config", "loss_config", "ml_collections"]
