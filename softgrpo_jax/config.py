"""ml-collections configuration: the full tree with defaults, command-line overrides, and typed views.

Every experiment file in ``configs/`` starts from :func:`base_config` and changes what differs. Overrides
``--config.a.b=value`` are type-checked against the existing field; an unknown or mistyped key fails with the valid
keys listed (and the closest matches). :func:`get_config` then checks every setting (:func:`validate_config`), so a
bad value fails before any model or data is loaded. A bundled config is named by its bare name (``demo_smollm2``);
anything with a folder in it is a path.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import ConfigDict, FieldReference

from softgrpo_jax.errors import UserError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(UserError, ValueError):
    """A config file or setting that cannot be used; the message names the file or key and what to do."""


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
        layout="auto",  # auto | scan | per_layer: how the decoder runs its layers (auto: per_layer on CPU and GPU,
        #   except for weights that stay FSDP shards while decoding: the layer scan)
        attention="auto",  # auto | xla | pallas: decode attention over the KV cache (pallas: each row's own context
        #   only, JAX's Pallas GPU decode kernel on GPU, the project's Pallas TPU kernel on TPU, not yet run on a
        #   TPU; auto: pallas on GPU, xla elsewhere)
        schedule="chunked",  # chunked | static: chunked decodes chunk_steps steps at a time over a cache just long
        #   enough, finished rows leave the batch between chunks, one prefill per prompt; static: one loop over the
        #   whole budget for every row (the reference; the same rollouts)
        chunk_steps=128,
        fuse_projections=True,  # decode with each layer's q / k / v weights as one GEMM and gate / up as one
        #   (4 weight GEMMs per layer instead of 7), in the engine's own decode copy of the weights, without
        #   tensor parallelism; the same rollouts
        max_rows_per_device=0,  # decode at most this many rows per batch device at a time, the prompts split into
        #   waves (the same rollouts); 0: only where the weights would otherwise decode from their FSDP shards, a
        #   copy replicated over the batch axes not fitting beside every row's KV cache (up to 4 waves)
    ))
    c.rl = ConfigDict(dict(
        algorithm="softgrpo",  # softgrpo | grpo (the baseline: discrete rollouts, same trainer)
        group_size=8,
        train_batch_size=64,  # prompts per step
        mini_batch_size=32,  # prompts per optimiser update
        micro_batch_size=2,  # sequences per forward/backward (gradient accumulation inside one jitted update)
        max_tokens_per_micro_batch=0,  # > 0: token-budget micro-batches instead (rows grouped by length, at most
        #   this many padded tokens per device each, padded to their own length bucket: rl/batching.py); 0 = fixed
        #   rows (micro_batch_size), every row padded to the longest
        new_shape_cost=0.1,  # token-budget micro-batches: a shape not compiled yet costs this share of a
        #   micro-batch's budget in the plan (micro-batches reuse compiled lengths; 0: padding alone decides)
        share_prompt=False,  # token-budget micro-batches only: where it saves a third of the token slots or more,
        #   a micro-batch computes each distinct prompt once and its rows continue it (the same loss). Pays where
        #   prompts are long against the responses; uses XLA's attention for those micro-batches (no cuDNN/splash)
        ppo_epochs=1,
        old_logprobs="auto",  # auto | recompute: the rollout policy's log-probs (PPO ratio denominator). auto: for
        #   the first mini-batch of a single epoch (updated with the rollout's params) they equal the current
        #   policy's, taken under stop_gradient inside the update instead of a separate forward pass (ratio 1, as
        #   recomputing gives up to rounding); later mini-batches get the pass; recompute: a separate pass for every
        #   mini-batch before the updates, as verl does
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
        resume_changed=False,  # resume a run although settings that shape what it learns differ from its
        #   checkpoint's (config.RESUME_MAY_CHANGE lists those that may change freely); default: refuse, naming them
        compilation_cache="auto",  # JAX's persistent compilation cache, so a resumed or repeated run skips most
        #   compiling: auto = $SOFTGRPO_COMPILATION_CACHE if set, else the project cache folder's jax/ (see
        #   checkpoint.embedded.cache_dir); or a folder; "" or "off" = no cache
    ))
    c.eval = ConfigDict(dict(
        n_samples=32,
        ks=(1, 2, 4, 8, 16, 32),
        batch_size=64,  # rows per generate call
        max_new_tokens=32768,
        scorer="math_verify_eval",  # the evaluation scorer of the original (docs/algorithm.md, "Evaluation")
        mode="gumbel",
        temperature=1.0, top_k=5, top_p=0.95, max_topk=5, tau=0.1, noise_factor=1.0,
        seed=0,
    ))
    c.compare = ConfigDict(dict(  # `softgrpo compare` only (softgrpo_jax/compare.py, docs/compare.md)
        arms=("grpo", "softgrpo"),  # grpo: discrete rollouts; softgrpo: rollout.mode (gumbel); () = untrained only
        seeds=(0, 1, 2),  # trainer.seed of each arm's runs (the same seeds for every arm)
        decodings=("discrete", "soft"),  # evaluation decodings, each applied to every policy (compare.DECODINGS)
        keep_checkpoints=False,  # keep each finished run's checkpoints (the trained policy); default: removed
    ))
    return c


# ------------------------------------------------------------------------------------------------------- loading
def bundled_configs() -> list[str]:
    """Bare names of the configs in the checkout's ``configs/`` folder."""
    if not os.path.isdir(BUNDLED_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(BUNDLED_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(path: str) -> str:
    """The file a ``--config`` value names: an existing file as given; a bare name (no folder in it, with or without
    ``.py``) is a bundled config. A path that does not exist is an error, never a bundled config of the same name."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a folder; give a .py file that defines get_config()")
    avail = bundled_configs()
    bare = os.sep not in path and (os.altsep is None or os.altsep not in path)
    if bare:
        name = path[:-3] if path.endswith(".py") else path
        cand = os.path.join(BUNDLED_DIR, name + ".py")
        if name and os.path.isfile(cand):
            return cand
        close = difflib.get_close_matches(name, avail, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"config {path!r} is neither a file nor a bundled config.{hint} Bundled configs (give the "
                          f"bare name, e.g. --config demo_smollm2): {', '.join(avail)}")
    raise ConfigError(f"config file {path!r} not found; check the path, or give a bundled config by its bare name "
                      f"(--config demo_smollm2): {', '.join(avail)}")


def load_config_file(path: str) -> ConfigDict:
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location("_softgrpo_config_" + os.path.basename(path)[:-3], path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python config file; give a .py file that defines get_config()")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        where = f"{e.filename or path}, line {e.lineno}" if e.lineno else (e.filename or path)
        raise ConfigError(f"{where}: syntax error in the config file: {e.msg}; fix the file") from e
    except (ImportError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the config file cannot be loaded ({type(e).__name__}: {e}); fix the "
                          f"file") from e
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path} defines no get_config(); a config file defines get_config() returning "
                          f"softgrpo_jax.config.base_config() with its changes")
    try:
        cfg = mod.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: name the file and the line
        raise ConfigError(f"{path}: get_config() failed{_user_frame(e, path)}: {type(e).__name__}: {e}; fix the "
                          f"config file") from e
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _user_frame(e: BaseException, path: str) -> str:
    """`` at line N`` of the deepest traceback frame inside ``path`` ("" if none)."""
    import traceback

    line = None
    for fr in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(fr.filename) == os.path.abspath(path):
            line = fr.lineno
    return f" at line {line}" if line else ""


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
        except (ValueError, SyntaxError):  # bare words: a,b or (a,b)
            inner = text.strip()
            if inner[:1] + inner[-1:] in ("()", "[]"):
                inner = inner[1:-1]
            v = tuple(s.strip() for s in inner.split(",") if s.strip())
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
            section = key.split(".")[0] + "."
            same = [k for k in keys if k.startswith(section)]
            if close:
                hint = f" Did you mean {', '.join(close)}?"
            elif same:
                hint = f" Keys under {section[:-1]}: {', '.join(same)}."
            else:
                hint = f" Sections: {', '.join(sorted({k.split('.')[0] for k in keys}))}."
            raise ConfigError(f"unknown config key {key!r} in {item!r}.{hint}",
                              detail="Valid keys:\n  " + "\n  ".join(keys))
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
    validate_config(cfg)
    return cfg


def flatten(d, prefix: str = "") -> dict:
    """A nested mapping (a config as JSON) as ``{"a.b": value}``; tuples as lists, as JSON has them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


# settings a run may change when it resumes from a checkpoint: where and how it computes (micro-batching, kernels,
# decode schedules and layouts, the mesh: the same results by design), what it logs, evaluates and exports, and for
# how many steps it runs. Every other setting shapes what the run learns.
RESUME_MAY_CHANGE = (
    "name", "model.remat", "model.attention", "data.data_dir", "data.manual_dir", "data.eval", "data.eval_limit",
    "rollout.embed_impl", "rollout.layout", "rollout.attention", "rollout.schedule", "rollout.chunk_steps",
    "rollout.fuse_projections", "rollout.max_rows_per_device", "rl.micro_batch_size",
    "rl.max_tokens_per_micro_batch", "rl.new_shape_cost", "rl.share_prompt", "rl.old_logprobs",
    "rl.logprob_chunk_size",
    "reward.workers", "reward.timeout_s", "trainer.output_dir", "trainer.total_steps", "trainer.save_every",
    "trainer.keep_checkpoints", "trainer.eval_every", "trainer.eval_before", "trainer.export_hf", "trainer.mesh",
    "trainer.log_every", "trainer.tensorboard", "trainer.progress", "trainer.resume_changed",
    "trainer.compilation_cache", "eval.", "compare.",
)
PATH_KEYS = ("model.path", "ref_model.path")


def resolved_path(path: str) -> str:
    """A model path as the folder or file it names (the same whatever the working directory); a name that is no
    path (``smollm2``) or "" as it is."""
    p = os.path.expanduser(path) if isinstance(path, str) else path
    return os.path.realpath(p) if isinstance(p, str) and p and os.path.exists(p) else path


def resume_differences(saved: dict, cfg: ConfigDict, saved_paths: dict | None = None) -> list[str]:
    """The settings, present in both, in which ``cfg`` differs from ``saved`` (the config a checkpoint stores, as
    JSON), other than :data:`RESUME_MAY_CHANGE`. Model paths are the same where they name the same folder
    (``saved_paths``: the checkpoint's :func:`resolved_path` of each, as a relative path depends on where the run
    started). ``trainer.total_steps`` may change unless the learning rate decays over it (``warmup_cosine``)."""
    import json

    a, b = flatten(saved), flatten(json.loads(cfg.to_json_best_effort()))
    saved_paths = saved_paths or {}
    fixed_length = b.get("optim.schedule") == "warmup_cosine"  # (the only schedule that depends on the length)
    out = []
    for k in sorted(set(a) & set(b)):
        if k == "trainer.total_steps" and fixed_length and a[k] != b[k]:
            out.append(k)
            continue
        if k.startswith(RESUME_MAY_CHANGE) or a[k] == b[k]:
            continue
        if k in PATH_KEYS and resolved_path(b[k]) in (saved_paths.get(k), resolved_path(a[k])):
            continue
        out.append(k)
    return out


# ------------------------------------------------------------------------------------------------------- checks
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def validate_config(cfg: ConfigDict) -> None:
    """Check every setting that can be checked without devices, model or data; ConfigError naming each bad key
    (all of them, on one line). Called by :func:`get_config`; the checks that need the device count (micro-batches
    per device, the mesh) run in ``train.Run`` before anything is loaded."""
    bad: list[str] = []

    def need(ok: bool, msg: str):
        if not ok:
            bad.append(msg)

    def num(key: str):
        node = cfg
        for p in key.split("."):
            node = node[p]
        return node

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def int_at_least(key, lo):
        v = num(key)
        need(is_int(v) and v >= lo, f"{key}={v!r} must be an integer >= {lo}")

    def num_check(key, cond, what):
        v = num(key)
        need(is_num(v) and cond(v), f"{key}={v!r} must be {what}")

    def one_of(key, choices):
        v = num(key)
        need(v in choices, f"{key}={v!r} must be one of {', '.join(map(str, choices))}")

    # model
    need(isinstance(cfg.model.path, str) and cfg.model.path.strip() != "", "model.path is empty; give a Hugging "
         "Face folder, a .gguf file, an orbax checkpoint or 'smollm2'")
    one_of("model.param_dtype", _FLOAT_DTYPES)
    one_of("model.compute_dtype", ("auto",) + _FLOAT_DTYPES)
    from softgrpo_jax.models.config import ATTENTION_IMPLS

    one_of("model.attention", ATTENTION_IMPLS)
    # data
    from softgrpo_jax.data import SPLITS
    from softgrpo_jax.data.prompts import STYLES

    one_of("data.train", tuple(SPLITS))
    if cfg.data.train in SPLITS:
        one_of("data.train_split", SPLITS[cfg.data.train])
    for item in cfg.data.eval:
        name, _, split = str(item).partition(":")
        if name not in SPLITS:
            bad.append(f"data.eval entry {item!r}: unknown data set {name!r}; choose from {', '.join(SPLITS)}")
        elif (split or "test") not in SPLITS[name]:
            bad.append(f"data.eval entry {item!r}: {name} has splits {', '.join(SPLITS[name])}")
    one_of("data.prompt_style", STYLES)
    int_at_least("data.max_prompt_length", 1)
    int_at_least("data.eval_limit", 0)
    int_at_least("data.reasoning_gym.train_size", 1)
    int_at_least("data.reasoning_gym.test_size", 1)
    tasks = cfg.data.reasoning_gym.tasks
    if isinstance(tasks, str) and tasks.strip():
        from softgrpo_jax.data.reasoning_gym_data import parse_tasks, task_problems

        try:
            problems = task_problems(parse_tasks(tasks))
        except (ValueError, SyntaxError, TypeError) as e:
            problems = [f"not a Python literal of tasks ({e})"]
        if problems:
            bad.append(f"data.reasoning_gym.tasks: {'; '.join(problems)}; give comma-separated task names or "
                       "((name, weight, ((key, value), ...)), ...)")
    # rollout
    from softgrpo_jax.sampling.step import MODES as ROLLOUT_MODES

    modes = tuple(ROLLOUT_MODES)
    one_of("rollout.mode", modes)
    one_of("eval.mode", modes)
    for sec in ("rollout", "eval"):
        int_at_least(f"{sec}.max_topk", 1)
        int_at_least(f"{sec}.max_new_tokens", 1)
        num_check(f"{sec}.temperature", lambda v: v > 0, "> 0")
        num_check(f"{sec}.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        num_check(f"{sec}.tau", lambda v: v > 0, "> 0")
        num_check(f"{sec}.noise_factor", lambda v: v >= 0, ">= 0")
        need(is_int(num(f"{sec}.top_k")), f"{sec}.top_k={num(f'{sec}.top_k')!r} must be an integer (<= 0: off)")
    num_check("rollout.after_thinking_temperature", lambda v: v > 0, "> 0")
    num_check("rollout.after_thinking_top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    num_check("rollout.min_p", lambda v: 0 <= v < 1, "in [0, 1)")
    num_check("rollout.after_thinking_min_p", lambda v: 0 <= v < 1, "in [0, 1)")
    one_of("rollout.noise", ("gumbel", "gaussian", "dirichlet"))
    one_of("rollout.think_end_match", ("full", "last_subtoken"))
    one_of("rollout.layout", ("auto", "scan", "per_layer"))
    one_of("rollout.attention", ("auto", "xla", "pallas"))
    one_of("rollout.schedule", ("chunked", "static"))
    num_check("rollout.chunk_steps", lambda v: isinstance(v, int) and v >= 1, ">= 1 (an integer)")
    num_check("rollout.max_rows_per_device", lambda v: isinstance(v, int) and v >= 0, ">= 0 (an integer; 0: automatic)")
    one_of("rollout.dtype", ("",) + _FLOAT_DTYPES)
    need(isinstance(cfg.rollout.fuse_projections, bool),
         f"rollout.fuse_projections={cfg.rollout.fuse_projections!r} must be true or false")
    need(isinstance(cfg.rollout.think_end, str) and cfg.rollout.think_end != "",
         "rollout.think_end is empty; give the text that closes the thinking block (e.g. </think>)")
    # rl
    one_of("rl.algorithm", ("softgrpo", "grpo"))
    for k in ("group_size", "train_batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs"):
        int_at_least(f"rl.{k}", 1)
    rl = cfg.rl
    if all(is_int(v) and v >= 1 for v in (rl.group_size, rl.train_batch_size, rl.mini_batch_size,
                                            rl.micro_batch_size)):
        need(rl.train_batch_size % rl.mini_batch_size == 0,
             f"rl.train_batch_size={rl.train_batch_size} is not a multiple of rl.mini_batch_size="
             f"{rl.mini_batch_size}")
        mini_rows = rl.mini_batch_size * rl.group_size
        need(mini_rows % rl.micro_batch_size == 0,
             f"a mini-batch of {mini_rows} sequences (rl.mini_batch_size={rl.mini_batch_size} x rl.group_size="
             f"{rl.group_size}) does not split into micro-batches of rl.micro_batch_size={rl.micro_batch_size}")
    one_of("rl.old_logprobs", ("auto", "recompute"))
    num_check("rl.train_temperature", lambda v: v > 0, "> 0")
    if rl.train_temperature != cfg.rollout.temperature:  # (the original's trainer takes the rollout's)
        bad.append(f"rl.train_temperature={rl.train_temperature} differs from rollout.temperature="
                   f"{cfg.rollout.temperature}: the loss would score the rollouts under another policy than the one "
                   "that sampled them (a soft step's implied noise would not be the noise drawn); set both alike")
    try:  # the loss's own checks (clip ratios, kl_type, loss_agg_mode)
        loss_config(cfg.rl, noise=cfg.rollout.noise)
    except (ValueError, TypeError) as e:
        bad.append(f"rl settings: {e}")
    int_at_least("rl.logprob_chunk_size", 0)
    int_at_least("rl.max_tokens_per_micro_batch", 0)
    need(not rl.share_prompt or rl.max_tokens_per_micro_batch > 0,
         "rl.share_prompt=true needs token-budget micro-batches (rl.max_tokens_per_micro_batch > 0)")
    num_check("rl.kl_coef", lambda v: v >= 0, ">= 0")
    num_check("rl.new_shape_cost", lambda v: 0 <= v < float("inf"), ">= 0 and finite")
    # optim
    num_check("optim.lr", lambda v: v >= 0, ">= 0")
    num_check("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    num_check("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    num_check("optim.eps", lambda v: v > 0, "> 0")
    num_check("optim.weight_decay", lambda v: v >= 0, ">= 0")
    num_check("optim.grad_clip", lambda v: v >= 0, ">= 0 (0 = no clipping)")
    one_of("optim.schedule", ("constant", "warmup_cosine", "warmup_constant"))
    int_at_least("optim.warmup_steps", 0)
    num_check("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
    # reward / eval scoring
    try:
        from softgrpo_jax.rewards import MODES as REWARD_MODES
    except ImportError:  # pragma: no cover - the scorer then reports an unknown mode itself
        REWARD_MODES = None
    if REWARD_MODES:
        one_of("reward.mode", tuple(REWARD_MODES))
        one_of("eval.scorer", ("math_verify_eval",) + tuple(REWARD_MODES))
    num_check("reward.timeout_s", lambda v: v > 0, "> 0 seconds")
    int_at_least("reward.workers", 0)
    one_of("reward.on_truncation", ("score", "zero"))
    # trainer
    need(isinstance(cfg.trainer.output_dir, str) and cfg.trainer.output_dir.strip() != "",
         "trainer.output_dir is empty; give the folder the run writes to")
    for k, lo in (("total_steps", 0), ("save_every", 0), ("keep_checkpoints", 1), ("eval_every", 0),
                  ("log_every", 1)):
        int_at_least(f"trainer.{k}", lo)
    mesh = tuple(cfg.trainer.mesh)
    if len(mesh) != 3 or not all(is_int(v) for v in mesh):
        bad.append(f"trainer.mesh={mesh!r} must be three integers (data, fsdp, tensor), e.g. (-1, 1, 1)")
    elif sum(v == -1 for v in mesh) > 1 or any(v == 0 or v < -1 for v in mesh):
        bad.append(f"trainer.mesh={mesh!r}: each entry is a device count >= 1, or -1 (the remaining devices) for "
                   "at most one axis")
    # eval
    int_at_least("eval.n_samples", 1)
    int_at_least("eval.batch_size", 1)
    ks = tuple(cfg.eval.ks)
    need(len(ks) > 0 and all(is_int(k) and k >= 1 for k in ks), f"eval.ks={ks!r} must be integers >= 1")
    # compare
    from softgrpo_jax.compare import ARMS, DECODINGS

    arms, seeds, decs = tuple(cfg.compare.arms), tuple(cfg.compare.seeds), tuple(cfg.compare.decodings)
    need(all(a in ARMS for a in arms) and len(set(arms)) == len(arms),
         f"compare.arms={arms!r} must be distinct names among {', '.join(ARMS)} (() = the untrained model only)")
    need(len(seeds) > 0 and all(is_int(s) and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds),
         f"compare.seeds={seeds!r} must be distinct integers >= 0")
    need(len(decs) > 0 and all(d in DECODINGS for d in decs) and len(set(decs)) == len(decs),
         f"compare.decodings={decs!r} must be distinct names among {', '.join(DECODINGS)}")
    if bad:
        raise ConfigError("; ".join(bad))


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


def engine_options(r: ConfigDict) -> dict:
    """The ``RolloutEngine.for_tokenizer`` keywords that a config's ``rollout`` section sets (besides sampling)."""
    return dict(think_end=r.think_end, embed_impl=r.embed_impl, dtype=r.dtype or None, layout=r.layout,
                attention=r.attention, schedule=r.schedule, chunk_steps=r.chunk_steps,
                fuse_projections=bool(r.fuse_projections), max_rows_per_device=r.max_rows_per_device)


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


__all__ = ["base_config", "get_config", "apply_overrides", "load_config_file", "ConfigError", "validate_config",
           "resolve_config_path", "bundled_configs", "sampling_config",
           "eval_sampling_config", "loss_config", "ml_collections"]
