"""``softgrpo train``: the whole run from a config (data, model, rollouts, updates, checkpoints, evals, export)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from softgrpo_jax import evaluation, rewards
from softgrpo_jax.config import engine_options, eval_sampling_config, loss_config, resolved_path, sampling_config
from softgrpo_jax.errors import debug_enabled, os_errno_in, os_error_message
from softgrpo_jax.fs import set_aside
from softgrpo_jax.distributed import allgather_rows, is_main_process, local_rows, make_mesh, to_host
from softgrpo_jax.rl.objective import group_advantages, loss_denominator
from softgrpo_jax.rl.trainer import (Checkpointer, GracefulInterrupt, MetricsLog, PolicyState,
                                     UnreadableCheckpoint, make_optimizer, processed_slots, read_jsonl,
                                     rollout_to_batch, split_micro, token_budget_groups)
from softgrpo_jax.sampling import RolloutEngine


def _is_closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _drop_closed_loop_reports():
    """After a failed orbax save, tensorstore completes write callbacks on the asyncio loop orbax has already closed.
    Python reports each ``RuntimeError('Event loop is closed')`` with a traceback, by whichever path the callback ran
    on (``sys.excepthook`` from native code, ``sys.unraisablehook``, ``threading.excepthook``), at any time until the
    process exits. The save's failure is reported in one line, so exactly those reports are dropped; any other goes
    to the previous hook. Installed once per process; kept with ``--debug``."""
    if debug_enabled() or getattr(sys, "_softgrpo_closed_loop_hooks", False):
        return
    prev_exc, prev_unraisable, prev_thread = sys.excepthook, sys.unraisablehook, threading.excepthook

    def excepthook(tp, value, tb):
        if not _is_closed_loop(value):
            prev_exc(tp, value, tb)

    def unraisablehook(u):
        if not _is_closed_loop(u.exc_value):
            prev_unraisable(u)

    def thread_hook(a):
        if not _is_closed_loop(a.exc_value):
            prev_thread(a)

    sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, thread_hook
    sys._softgrpo_closed_loop_hooks = True


@contextlib.contextmanager
def _quiet_background_tracebacks():
    """orbax logs the traceback of a failed background write (a full disk) on the ``absl`` logger before raising it
    in the caller; the caller reports it in one line, so those records are dropped (kept with ``--debug``). The
    closed-loop reports that follow such a failure can come while the save still runs, so their filter is in place
    before it starts."""
    if debug_enabled():
        yield
        return
    _drop_closed_loop_reports()

    def drop(record):
        return not (record.levelno >= logging.ERROR and (record.exc_info or "Event loop is closed" in
                                                         record.getMessage()))

    loggers = [logging.getLogger(n) for n in ("absl", "concurrent.futures", "asyncio")]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def log(msg: str):
    if is_main_process():
        print(f"[softgrpo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def enable_compilation_cache(setting: str) -> str | None:
    """Point JAX's persistent compilation cache at the folder ``setting`` names (``trainer.compilation_cache``):
    ``auto`` = ``$SOFTGRPO_COMPILATION_CACHE`` if set, else ``<cache_dir()>/jax``; ``""`` / ``off`` = leave JAX as it
    is. Programs that took at least ``jax_persistent_cache_min_compile_time_secs`` (JAX's default 1 s) to compile are
    written there and read back by the next process that compiles the same program for the same devices and flags.
    Returns the folder in use, or None. A folder already set (by the user or an earlier run) is kept. The cache is
    not capped (JAX's ``jax_compilation_cache_max_size``, env ``JAX_COMPILATION_CACHE_MAX_SIZE``, caps it)."""
    setting = (setting or "").strip()
    if setting.lower() == "auto":
        setting = os.environ.get("SOFTGRPO_COMPILATION_CACHE", "")
        if not setting:
            from softgrpo_jax.checkpoint.embedded import cache_dir

            setting = os.path.join(cache_dir(), "jax")
    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if setting.lower() in ("", "off", "none", "false", "0"):
        return current or None
    if current:
        return current
    if "://" in setting:  # a URL JAX's cache opens itself (gs://bucket/cache: shared by a pod's hosts)
        jax.config.update("jax_compilation_cache_dir", setting)
        return setting
    path = os.path.abspath(os.path.expanduser(setting))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a cache is an optimisation: never a reason to stop a run
        log(f"compilation cache {path} not usable ({e}); compiling without it")
        return None
    jax.config.update("jax_compilation_cache_dir", path)  # (JAX opens the cache at the next compile)
    return path


# ------------------------------------------------------------------------------------------------------ data
def _rg_kwargs(cfg: ConfigDict) -> dict:
    rg = cfg.data.reasoning_gym
    kw: dict[str, Any] = dict(train_size=rg.train_size, test_size=rg.test_size, seed=rg.seed)
    if rg.tasks.strip():
        from softgrpo_jax.data.reasoning_gym_data import parse_tasks

        kw["tasks"] = parse_tasks(rg.tasks)
    return kw


def load_problems(cfg: ConfigDict, name: str, split: str, tokenizer, *, limit: int = 0) -> tuple[list[dict], int]:
    from softgrpo_jax import data as data_lib

    kw = _rg_kwargs(cfg) if name == "reasoning_gym_math" else {}
    ex = data_lib.load_split(name, split, data_dir=cfg.data.data_dir or None,
                             manual_dir=cfg.data.manual_dir or None, **kw)
    if limit:
        ex = ex[:limit]
    ps = data_lib.prepare_prompts(tokenizer, ex, style=cfg.data.prompt_style,
                                  max_prompt_length=cfg.data.max_prompt_length)
    skipped = getattr(ex, "skipped", 0)
    if ps.num_filtered or skipped:
        log(f"{name}:{split}: {ps.num_filtered} prompts longer than {cfg.data.max_prompt_length} tokens filtered, "
            f"{skipped} malformed rows skipped")
    return ps.examples, ps.num_filtered


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_for_step(problems: list[dict], step: int, batch_size: int, seed: int, shuffle: bool) -> list[dict]:
    """The prompts of (0-based) step ``step``: a pure function of (seed, step), so resuming needs no iterator state."""
    n = len(problems)
    per_epoch = n // batch_size
    if per_epoch == 0:
        from softgrpo_jax.config import ConfigError

        raise ConfigError(f"the training split has {n} problems, fewer than rl.train_batch_size={batch_size}")
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch, shuffle)
    return [problems[i] for i in order[k * batch_size:(k + 1) * batch_size]]


@contextlib.contextmanager
def _output_lock(out: str, where: str):
    """Hold ``out/.softgrpo.lock`` (an advisory lock, taken by process 0; every process learns the outcome) while a
    run writes the folder: a second run started on the same folder would save over the first's checkpoints
    (orbax's temporary folder of a step is the same name) and interleave the metrics. A file system without locks
    (Lustre mounted noflock, NFS without lockd) runs without one, with a note."""
    import errno
    import fcntl

    from softgrpo_jax.checkpoint import CheckpointError

    f, holder = None, None
    if is_main_process():
        f = open(os.path.join(out, ".softgrpo.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.seek(0)
                holder = f.read().strip() or "another process"
            else:
                log(f"note: {where}: this file system takes no file locks ({os_error_message(e)}); make sure only "
                    f"one run writes the folder at a time")
            f.close()
            f = None
    refused = holder is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(int(multihost_utils.broadcast_one_to_all(np.int32(refused))))
    try:
        if refused:
            raise CheckpointError(f"{where} is in use by another run ({holder or 'see process 0'}); wait for it to "
                                  f"end, or choose another output folder")
        yield
    finally:
        if f is not None:
            f.close()  # (closing releases the lock)


# ------------------------------------------------------------------------------------------------------ run
class Run:
    """Everything a training run holds; ``Run(cfg).train()``."""

    def __init__(self, cfg: ConfigDict, *, reward_fn=None):
        """``reward_fn(texts, golds) -> float array`` replaces the configured math reward (custom tasks, tests).

        Every setting is checked before anything heavy is loaded, and the output folder is made only once the model
        and the data have loaded: a run that fails at start-up leaves nothing behind."""
        from softgrpo_jax import load_pretrained, load_tokenizer
        from softgrpo_jax.checkpoint.api import check_destination, detect_format
        from softgrpo_jax.config import ConfigError, validate_config

        self.cfg = cfg
        self.reward_fn = reward_fn
        validate_config(cfg)  # (get_config did already; a config built in code has not)
        self.out = os.path.abspath(cfg.trainer.output_dir)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"trainer.output_dir={cfg.trainer.output_dir!r} is a file, not a folder; choose "
                              f"another output folder")
        self.mesh = make_mesh(tuple(cfg.trainer.mesh))
        self._check_settings()
        mc = cfg.model
        for key, path in (("model.path", mc.path), ("ref_model.path", cfg.ref_model.path)):
            if path:
                try:
                    detect_format(path)
                except FileNotFoundError as e:
                    raise ConfigError(f"{key}: {e}") from None
        if cfg.trainer.export_hf:
            # (checked now: the export comes at the very end of the run)
            check_destination(os.path.join(self.out, "hf_export"),
                              fix="move it away, or set trainer.export_hf=false (the run writes its final model "
                                  "there)")
        enable_compilation_cache(cfg.trainer.compilation_cache)
        log(f"loading {mc.path} on mesh {dict(self.mesh.shape)}")
        model = load_pretrained(mc.path, dtype=mc.param_dtype, compute_dtype=mc.compute_dtype, mesh=self.mesh,
                                scan_layers=mc.scan_layers, remat=mc.remat, attention=mc.attention)
        log(f"compute dtype {np.dtype(model.config.jnp_dtype)}"
            f"{' (model.compute_dtype=auto)' if mc.compute_dtype == 'auto' else ''}, weights "
            f"{np.dtype(model.config.jnp_param_dtype)}, remat {'on' if model.config.remat else 'off'}")
        self.tokenizer = load_tokenizer(mc.path)
        ref = None
        if cfg.ref_model.path:
            ref = load_pretrained(cfg.ref_model.path, dtype=mc.param_dtype, compute_dtype=mc.compute_dtype,
                                  mesh=self.mesh, scan_layers=mc.scan_layers)
        ctx = model.config.max_position_embeddings
        if cfg.data.max_prompt_length + cfg.rollout.max_new_tokens > ctx:
            log(f"note: data.max_prompt_length={cfg.data.max_prompt_length} + rollout.max_new_tokens="
                f"{cfg.rollout.max_new_tokens} exceeds the model's context of {ctx} tokens; long prompts and "
                f"responses run past the positions it was trained on")
        self.problems, self.n_filtered = load_problems(cfg, cfg.data.train, cfg.data.train_split, self.tokenizer)
        rl = cfg.rl
        if len(self.problems) < rl.train_batch_size:
            why = (f" after {self.n_filtered} prompts longer than data.max_prompt_length="
                   f"{cfg.data.max_prompt_length} tokens were filtered" if self.n_filtered else "")
            raise ConfigError(f"data.train={cfg.data.train}:{cfg.data.train_split} has {len(self.problems)} "
                              f"problems{why}, fewer than rl.train_batch_size={rl.train_batch_size}; "
                              + ("raise data.max_prompt_length or " if self.n_filtered else "add problems or ")
                              + "lower rl.train_batch_size")
        self.total_steps = cfg.trainer.total_steps or len(self.problems) // rl.train_batch_size
        oc = cfg.optim
        tx = make_optimizer(oc.lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                            grad_clip=oc.grad_clip, schedule=oc.schedule, warmup_steps=oc.warmup_steps,
                            total_steps=self.total_steps, min_lr_ratio=oc.min_lr_ratio)
        mode = "discrete" if cfg.rl.algorithm == "grpo" else cfg.rollout.mode
        self.loss_cfg = loss_config(cfg.rl, noise=cfg.rollout.noise)
        self.policy = PolicyState(model, tx, self.loss_cfg, self.mesh, ref_model=ref)
        self.share_prompt = bool(cfg.rl.share_prompt) and cfg.rl.max_tokens_per_micro_batch > 0
        self.micro_shapes: set[tuple[int, int]] = set()  # token-budget micro-batch shapes (T, R) compiled so far
        self.rollout_mode = mode
        samp = dataclasses.replace(sampling_config(cfg.rollout), mode=mode)
        # prompts are left-padded to length buckets of at least 128 tokens: few compiled shapes
        self.engine = RolloutEngine.for_tokenizer(model, samp, self.tokenizer, mesh=self.mesh,
                                                  min_bucket=min(128, cfg.data.max_prompt_length),
                                                  **engine_options(cfg.rollout))
        self.eval_engine = RolloutEngine.for_tokenizer(model, eval_sampling_config(cfg.eval, cfg.rollout),
                                                       self.tokenizer, mesh=self.mesh, **engine_options(cfg.rollout))
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"trainer.output_dir: {os_error_message(e)}") from None
        self.ckpt = Checkpointer(os.path.join(self.out, "checkpoints"), keep=cfg.trainer.keep_checkpoints)
        self.key = jax.random.key(cfg.trainer.seed)
        self.step = 0

    def _check_settings(self):
        """The settings that depend on the devices (the mesh); the rest are checked by ``validate_config``."""
        from softgrpo_jax.config import ConfigError

        rl = self.cfg.rl
        n_dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        mini_rows = rl.mini_batch_size * rl.group_size
        micro_rows = rl.micro_batch_size * n_dp
        if mini_rows % micro_rows:
            raise ConfigError(f"a mini-batch of {mini_rows} sequences (rl.mini_batch_size x rl.group_size) does "
                              f"not split into micro-batches of {micro_rows} (rl.micro_batch_size="
                              f"{rl.micro_batch_size} per data-parallel device x {n_dp} devices of trainer.mesh="
                              f"{tuple(self.cfg.trainer.mesh)}); choose sizes that divide")
        self.n_micro = mini_rows // micro_rows

    # ---------------------------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        rl = cfg.rl
        t0 = time.time()
        problems = batch_for_step(self.problems, step, rl.train_batch_size, cfg.trainer.seed, cfg.data.shuffle)
        key = jax.random.fold_in(self.key, step)
        model = self.policy.model
        r = self.engine.generate([p["prompt_ids"] for p in problems], key, n=rl.group_size, model=model)
        jax.block_until_ready(r.tokens)
        t1 = time.time()
        toks = to_host(r.tokens)  # every process calls to_host (a gather when the rollout spans processes)
        lens = to_host(r.lengths)
        # rewards: each process scores only the rows its devices hold, then the scores are shared
        rows = local_rows(r.tokens)
        texts = [self.tokenizer.decode(toks[b, :lens[b]].tolist(), skip_special_tokens=True) for b in rows]
        all_golds = [str(p["answer"]) for p in problems for _ in range(rl.group_size)]
        golds = [all_golds[b] for b in rows]
        workers = cfg.reward.workers if cfg.reward.workers > 0 else None
        unverified = np.zeros(len(rows), np.float32)
        if self.reward_fn is not None:
            rew = np.asarray(self.reward_fn(texts, golds), np.float32)
        else:
            rew, unv = rewards.score_rows(texts, golds, mode=cfg.reward.mode, workers=workers,
                                          timeout_s=cfg.reward.timeout_s)
            unverified = unv.astype(np.float32)
        both = allgather_rows(np.stack([np.asarray(rew, np.float32), unverified], 1), rows, toks.shape[0])
        rew, unverified = both[:, 0], both[:, 1]
        finish = to_host(r.finish_reason)
        truncated = finish == 0
        if cfg.reward.on_truncation == "zero":
            rew = np.where(truncated, np.float32(0.0), rew)
        t2 = time.time()
        adv = np.asarray(group_advantages(jax.numpy.asarray(rew), rl.group_size))
        # response lengths are bucketed to powers of two of at least half the budget (the whole budget when it is
        # short): at most two compiled shapes for the log-prob and update functions
        budget = cfg.rollout.max_new_tokens
        batch = rollout_to_batch(r, adv, min_bucket=budget if budget <= 256 else budget // 2)
        n_mini = rl.train_batch_size // rl.mini_batch_size
        mini_rows = rl.mini_batch_size * rl.group_size
        # old and reference log-probs over the whole batch, micro-batch by micro-batch, before any update. The first
        # mini-batch of a single epoch is updated with the rollout's params, so (rl.old_logprobs="auto") its old
        # log-probs are the update's own under stop_gradient: only the later mini-batches need the separate pass.
        # With several mini-batches the rows say which they are ("on_policy"; the first one's old log-probs are
        # placeholders), so on- and off-policy micro-batches of a shape share one compiled update
        first_on_policy = rl.old_logprobs == "auto" and rl.ppo_epochs == 1
        if first_on_policy and n_mini > 1:
            batch["on_policy"] = np.arange(batch["tokens"].shape[0]) < mini_rows
        real, shared = int(batch["attention_mask"].sum()), 0.0
        if rl.max_tokens_per_micro_batch > 0:
            minis, (processed, real, shared) = self._token_budget_minis(
                batch, n_mini, mini_rows, first_on_policy, r.prompt_tokens.shape[1] if self.share_prompt else None)
            t3 = time.time()
            upd = [self.policy.update_groups(groups, den) for _ in range(rl.ppo_epochs) for groups, den in minis]
        else:
            n = self.n_micro
            all_mb = self.policy.put(split_micro(batch, n_mini * n))
            processed = batch["attention_mask"].size
            skip = n if first_on_policy else 0  # micro-batches whose old log-probs come from the update itself
            rest = (self.policy.logprobs(self.policy.params, jax.tree.map(lambda a: a[skip:], all_mb))
                    if n_mini * n > skip else None)
            ref_lp = self.policy.logprobs(self.policy.ref_params, all_mb) if rl.use_kl_loss else None
            jax.block_until_ready((rest, ref_lp))
            t3 = time.time()
            upd = []
            for _ in range(rl.ppo_epochs):
                for m in range(n_mini):
                    sl = slice(m * n, (m + 1) * n)
                    mb = jax.tree.map(lambda a: a[sl], all_mb)
                    old = None if m * n < skip else rest[m * n - skip:(m + 1) * n - skip]
                    if old is None and rest is not None:  # placeholders in the shape of the others (see above)
                        old = jax.numpy.zeros_like(rest[:n])
                    upd.append(self.policy.update(mb, old, old if ref_lp is None else ref_lp[sl]))
        upd = jax.device_get(upd)
        t4 = time.time()
        resp_tokens = int(lens.sum())
        think = to_host(r.think_lengths)
        soft = to_host(r.soft_mask).sum(1)
        rlp, rmask = to_host(r.logprobs), to_host(r.response_mask)
        group_any = rew.reshape(-1, rl.group_size).max(1)
        metrics = {
            "reward_mean": float(rew.mean()),
            "group_pass_rate": float(group_any.mean()),
            "response_length": float(lens.mean()),
            "thinking_length": float(think.mean()),
            "soft_steps": float(soft.mean()),
            "finished_fraction": float((finish == 1).mean()),
            "truncated_fraction": float(truncated.mean()),
            # responses whose reward check did not finish (past reward.timeout_s, or the checker crashed): reward 0
            "reward_unverified": int(unverified.sum()),
            "advantage_abs_mean": float(np.abs(adv).mean()),
            "rollout_logprob_mean": float((rlp * rmask).sum() / max(rmask.sum(), 1)),
        }
        for k in upd[0]:
            vals = np.asarray([u[k] for u in upd], np.float64)
            metrics[k] = float(vals.sum() if k == "skipped" else (vals.max() if "_max" in k else vals.mean()))
        metrics.update({
            "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_logprob_s": t3 - t2,
            "time_update_s": t4 - t3, "step_time_s": t4 - t0,
            "rollout_tokens_per_s": resp_tokens / max(t1 - t0, 1e-9),
            "train_tokens_per_s": float(batch["attention_mask"].sum()) * rl.ppo_epochs / max(t4 - t3, 1e-9),
            # the share of the update's token slots that hold no real token
            "train_padding_fraction": 1.0 - real / max(processed, 1),
            # the share of token-budget micro-batches that computed each prompt once (rl.share_prompt)
            "train_shared_prompt_fraction": shared,
        })
        return metrics

    def _token_budget_minis(self, batch, n_mini: int, mini_rows: int, first_on_policy: bool,
                            prompt_width: int | None = None):
        """Each mini-batch as token-budget micro-batches (``rl.max_tokens_per_micro_batch`` per device; shared
        prompts with ``prompt_width``), with their old (none for the first mini-batch when ``first_on_policy``) and
        reference log-probs (all before any update) and the mini-batch's loss denominator; and (the token slots they
        process, the real tokens among them, the share of micro-batches with shared prompts)."""
        rl = self.cfg.rl
        n_dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        minis, pending = [], []
        processed = real = n_shared = n_micro = 0
        for m in range(n_mini):
            rows = {k: v[m * mini_rows:(m + 1) * mini_rows] for k, v in batch.items()}
            groups = []
            planned = token_budget_groups(rows, rl.max_tokens_per_micro_batch, n_dp, prompt_width=prompt_width,
                                          known=self.micro_shapes, new_shape_cost=rl.new_shape_cost)
            # one micro-batch per call: a compiled program then depends on the shape (T, R) alone, not on how many
            # micro-batches of it a mini-batch has, so later steps reuse it
            for g in (jax.tree.map(lambda a, i=i: a[i:i + 1], g) for g in planned for i in range(len(g["tokens"]))):
                if "prefix_idx" not in g:
                    self.micro_shapes.add((g["tokens"].shape[2], g["tokens"].shape[1]))
                p, r = processed_slots(g)
                processed, real = processed + p, real + r
                n_micro += 1
                n_shared += 1 if "prefix_idx" in g else 0
                mb = self.policy.put(g)
                if first_on_policy and m == 0:  # placeholders when later mini-batches have old log-probs
                    old = None if n_mini == 1 else self.policy.put(np.zeros(g["tokens"].shape, np.float32))
                else:
                    old = self.policy.logprobs(self.policy.params, mb)
                ref = self.policy.logprobs(self.policy.ref_params, mb) if rl.use_kl_loss else old
                groups.append((mb, old, ref))
                pending.append((old, ref))
            minis.append((groups, loss_denominator(jax.numpy.asarray(rows["loss_mask"]), self.policy.loss_cfg)))
        jax.block_until_ready(pending)
        return minis, (processed, real, n_shared / max(n_micro, 1))

    # ---------------------------------------------------------------------------------------------- eval
    def eval_benchmarks(self) -> dict[str, list[dict]]:
        out = {}
        for item in self.cfg.data.eval:
            name, _, split = item.partition(":")
            split = split or "test"
            probs, _ = load_problems(self.cfg, name, split, self.tokenizer, limit=self.cfg.data.eval_limit)
            out[f"{name}:{split}" if name != "reasoning_gym_math" else "reasoning_gym"] = probs
        return out

    def evaluate(self, tag: str) -> dict:
        from softgrpo_jax.eval_runner import evaluate

        if not hasattr(self, "_bench"):
            self._bench = self.eval_benchmarks()
        e = self.cfg.eval
        res, timing = evaluate(self.eval_engine, self.tokenizer, self._bench, n=e.n_samples, batch_size=e.batch_size,
                               key=jax.random.key(e.seed), model=self.policy.model, scorer=e.scorer,
                               timeout_s=self.cfg.reward.timeout_s)
        ks = [k for k in e.ks if k <= e.n_samples] or [1]
        if is_main_process():
            summaries = evaluation.write_reports(os.path.join(self.out, "eval", tag), res, ks=ks,
                                                 config={"tag": tag, "mode": e.mode}, title=f"{self.cfg.name} ({tag})")
        else:
            summaries = {b: evaluation.summarize(v, ks=ks) for b, v in res.items()}
        for name, s in summaries.items():
            log(f"eval[{tag}] {name}: pass@1 {s['pass@1']:.3f} " + " ".join(
                f"pass@{k} {s[f'pass@{k}']:.3f}" for k in ks if k > 1 and f"pass@{k}" in s))
        return summaries

    # ---------------------------------------------------------------------------------------------- loop
    def save(self, step: int):
        meta = {"step": step, "seed": self.cfg.trainer.seed, "data_position": step * self.cfg.rl.train_batch_size,
                "total_steps": self.total_steps, "config": json.loads(self.cfg.to_json_best_effort()),
                # the token-budget shapes compiled so far: a resumed run plans (and so sums) as the unbroken one
                "micro_batch_shapes": sorted([int(T), int(R)] for T, R in self.micro_shapes),
                "resolved_paths": {k: resolved_path(v) for k, v in (("model.path", self.cfg.model.path),
                                                                    ("ref_model.path", self.cfg.ref_model.path))}}
        try:
            with _quiet_background_tracebacks():
                self.ckpt.save(step, self.policy.params, self.policy.opt_state, meta)
        except (OSError, ValueError) as e:
            code = os_errno_in(e)
            if code is None:
                raise
            from softgrpo_jax.checkpoint import CheckpointError

            for name in os.listdir(self.ckpt.dir):  # orbax's half-written step (it renames it when complete)
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.ckpt.dir, name), ignore_errors=True)
            hint = os_error_message(OSError(code, os.strerror(code)))
            latest = self.ckpt.latest_step()
            kept = f"the checkpoint of step {latest} is kept" if latest is not None else "no checkpoint is kept"
            raise CheckpointError(f"could not write the checkpoint of step {step} to {self.ckpt.dir}: {hint}; "
                                  f"{kept}; run the same command again to resume") from e

    def maybe_resume(self) -> int:
        """The step to start from: the latest checkpoint's, once it is known to belong to this run (the same
        settings, ``config.resume_differences``) and to be readable; else 0. Refuses, in one line, a checkpoint
        of other settings, one past ``trainer.total_steps``, and a damaged one (naming the earlier kept step)."""
        from softgrpo_jax.checkpoint import CheckpointError
        from softgrpo_jax.config import flatten, resume_differences
        from softgrpo_jax.errors import one_line

        where = f"trainer.output_dir={self.cfg.trainer.output_dir!r}"
        latest = self.ckpt.latest_step()
        if latest is None:
            self._start_without_checkpoint(where)
            return 0
        earlier = [s for s in self.ckpt.all_steps() if s < latest]

        def damaged(why: str) -> CheckpointError:
            fix = (f"move {self.ckpt.dir}/{latest} out of {self.ckpt.dir} to resume from step {earlier[-1]}"
                   if earlier else "choose a new output folder")
            return CheckpointError(f"the checkpoint of step {latest} in {self.ckpt.dir} cannot be read "
                                   f"({why[:300]}); {fix}")

        missing = self.ckpt.missing_items(latest)
        if missing:
            raise damaged(f"its {', '.join(missing)} is missing")
        try:
            meta = self.ckpt.read_meta(latest)
        except Exception as e:  # noqa: BLE001 - orbax raises plain Exceptions for unreadable data
            raise damaged(one_line(e)) from None
        saved = meta.get("config") if isinstance(meta, dict) else None
        diff = resume_differences(saved, self.cfg, meta.get("resolved_paths")) if isinstance(saved, dict) else []
        if diff:
            a, b = flatten(saved), flatten(json.loads(self.cfg.to_json_best_effort()))
            shown = "; ".join(f"{k} {a[k]!r} -> {b[k]!r}" for k in diff[:4]) + (
                f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            if not self.cfg.trainer.resume_changed:
                raise CheckpointError(f"{where} holds a run (step {latest}) made with other settings: {shown}; "
                                      f"run it with its own settings, choose a new output folder, or set "
                                      f"trainer.resume_changed=true to go on with the new ones")
            log(f"note: resuming step {latest} with changed settings (trainer.resume_changed): {shown}")
        if latest > self.total_steps:
            raise CheckpointError(f"{where} holds step {latest}, past trainer.total_steps={self.total_steps}: "
                                  f"raise trainer.total_steps to continue that run, or choose a new output folder")
        try:
            with _quiet_background_tracebacks():
                try:
                    params, opt, meta = self.ckpt.restore(latest, self.policy.params, self.policy.opt_state)
                except Exception:
                    gc.collect()  # orbax's failed reads log as their asyncio tasks are collected: inside the filter
                    raise
        except UnreadableCheckpoint as e:  # a truncated or corrupt array file
            raise damaged(one_line(e)) from None
        except ValueError as e:
            msg = " ".join(str(e).split())[:400]
            raise CheckpointError(f"{msg}; the run in {where} was made with another model or optimizer: choose a "
                                  f"new output folder") from None
        self.policy.params, self.policy.opt_state = params, opt
        try:  # (only what the plans reuse: a checkpoint without it resumes with none)
            self.micro_shapes = {(int(T), int(R)) for T, R in meta.get("micro_batch_shapes") or []}
        except (TypeError, ValueError):
            self.micro_shapes = set()
        log(f"resumed from {self.ckpt.dir}/{latest} (data position {meta.get('data_position')})")
        return int(latest)

    def _start_without_checkpoint(self, where: str) -> None:
        """A folder without checkpoints may still hold an earlier start's metrics (a run stopped before its first
        checkpoint): they are kept beside, not overwritten. A finished run whose checkpoints were removed is
        refused: training again would replace its export."""
        from softgrpo_jax.checkpoint import CheckpointError

        path = os.path.join(self.out, "metrics.jsonl")
        steps = 0
        if os.path.isfile(path):
            steps = sum(1 for r in read_jsonl(path) if r.get("kind", "train") == "train")
        if not steps:
            return
        export = os.path.join(self.out, "hf_export")
        if os.path.isdir(export) and os.listdir(export):
            raise CheckpointError(f"{where} holds a trained run ({steps} steps in metrics.jsonl, its export in "
                                  f"{export}) but no checkpoint to resume from; choose a new output folder, or move "
                                  f"metrics.jsonl and hf_export aside to train again")
        if is_main_process():
            kept = set_aside(path)
            log(f"no checkpoint in {self.ckpt.dir}: training from step 0; the {steps} steps an earlier start "
                f"logged are kept in {kept}")

    def train(self, *, evaluate_after: bool = True) -> dict:
        """Train (resuming from the latest checkpoint), then evaluate with ``cfg.eval`` unless ``evaluate_after`` is
        false (``softgrpo compare`` evaluates the policy itself) and export; the report holds the per-step metrics.
        One run at a time per output folder (a lock file in it)."""
        with _output_lock(self.out, f"trainer.output_dir={self.cfg.trainer.output_dir!r}"):
            return self._train(evaluate_after=evaluate_after)

    def _train(self, *, evaluate_after: bool) -> dict:
        cfg = self.cfg
        start = self.maybe_resume()
        mlog = MetricsLog(self.out, tensorboard=cfg.trainer.tensorboard, resume_step=start)
        report: dict[str, Any] = {"out": self.out}
        before_path = os.path.join(self.out, "eval", "before", "summary.json")
        if cfg.trainer.eval_before and start == 0 and not os.path.exists(before_path):
            report["before"] = self.evaluate("before")
        pbar = None
        if cfg.trainer.progress and is_main_process():
            from tqdm.auto import tqdm

            pbar = tqdm(total=self.total_steps, initial=start, desc="SofT-GRPO" if self.rollout_mode != "discrete"
                        else "GRPO", unit="step", dynamic_ncols=True)
        interrupted = False
        with GracefulInterrupt() as stop:
            for step in range(start, self.total_steps):
                m = self.train_step(step)
                mlog.write(step + 1, m)
                self.step = step + 1
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['response_length']:.0f}",
                                     kl=f"{m['kl_token']:.2e}", gn=f"{m['grad_norm']:.2f}")
                last = step + 1 == self.total_steps
                if stop.requested or last or (cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0):
                    self.save(step + 1)
                if stop.requested:
                    interrupted = True
                    log(f"stopped after step {step + 1}; run the same command again to resume")
                    break
                if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and not last:
                    s = self.evaluate(f"step_{step + 1}")
                    mlog.write(step + 1, {f"{n}/pass@1": v["pass@1"] for n, v in s.items()}, kind="eval")
        if pbar is not None:
            pbar.close()
        report["interrupted"] = interrupted
        report["steps"] = self.step
        if interrupted:
            return report
        if evaluate_after and (self.total_steps > start or
                               not os.path.exists(os.path.join(self.out, "eval", "after", "summary.json"))):
            report["after"] = self.evaluate("after")
        if cfg.trainer.export_hf:
            from flax import nnx

            from softgrpo_jax import save_pretrained

            path = os.path.join(self.out, "hf_export")
            model = self.policy.model
            if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
                model = nnx.merge(self.policy.graphdef, jax.tree.map(to_host, self.policy.params))
            if is_main_process():
                save_pretrained(model, path, tokenizer=self.tokenizer)
                log(f"exported the trained policy to {path} (transformers.AutoModelForCausalLM.from_pretrained)")
            report["export"] = path
        self.ckpt.close()
        report["metrics"] = mlog.read()
        return report
