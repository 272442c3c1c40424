"""The SofT-GRPO / GRPO trainer: rollouts -> rewards -> advantages -> old/ref log-probs -> jitted, donated updates.

One step (docs/algorithm.md, "Objective", "Settings of the original runs"):
  1. ``train_batch_size`` prompts, each ``group_size`` times, through the rollout engine (Gumbel soft thinking for
     SofT-GRPO, discrete sampling for the GRPO baseline);
  2. math rewards on the decoded responses; group advantages ``(r - mean) / (std + 1e-6)``;
  3. old log-probs (current params, before any update) and reference log-probs (frozen initial params);
  4. ``train_batch_size / mini_batch_size`` optimiser updates, each one jitted function that accumulates exact
     micro-batch gradients (sum/denominator pairs) and applies clip-by-global-norm + AdamW, skipping (and counting) an
     update whose gradient norm is not finite.

State (params, optimizer, step) is checkpointed with orbax; the data order and every PRNG key are functions of
(seed, step), so a resumed run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import (BATCH_AXES, fit_spec, host_to_global, is_main_process, state_shardings,
                                     to_host, with_activation_sharding)
from softgrpo_jax.rl.batching import gather_micro_batches, gather_prefix_micro_batches, plan_token_budget
from softgrpo_jax.rl.logprobs import token_logprobs
from softgrpo_jax.rl.objective import LossConfig, accumulate_terms, finalize_metrics, loss_denominator, loss_fn
from softgrpo_jax.sampling import Rollout, bucket_length
from softgrpo_jax.xla_options import compiler_options, mesh_backend

BATCH_FIELDS = ("tokens", "attention_mask", "topk_ids", "topk_ytil", "soft_mask", "loss_mask", "advantages", "tau",
                "topk_kept", "topk_clamped")


# ------------------------------------------------------------------------------------------------------ batches
def rollout_to_batch(r: Rollout, advantages: np.ndarray, *, min_bucket: int = 16) -> dict[str, np.ndarray]:
    """Concatenate prompt and response into the trainer's [B, T] layout (docs/algorithm.md, "Stored quantities"), trimming the response
    to a length bucket that holds every row. ``topk_kept`` / ``topk_clamped`` come along where the rollout has them
    (prompt positions: slot 0 kept, nothing clamped)."""
    g = to_host  # the global rollout on every process (a collective gather when it spans several processes)
    pt, pm = np.asarray(g(r.prompt_tokens)), np.asarray(g(r.prompt_mask))
    lens = np.asarray(g(r.lengths))
    L = min(r.tokens.shape[1], bucket_length(max(int(lens.max()), 1), min_bucket, fine=False))
    B, Pn = pt.shape
    K = r.topk_ids.shape[-1]
    prompt_ids = np.zeros((B, Pn, K), np.int32)
    prompt_ids[..., 0] = pt
    slots = {}
    if r.topk_kept is not None:
        prompt_kept = np.zeros((B, Pn, K), bool)
        prompt_kept[..., 0] = True
        slots["topk_kept"] = np.concatenate([prompt_kept, np.asarray(g(r.topk_kept))[:, :L]], 1).astype(bool)
    if r.topk_clamped is not None:
        slots["topk_clamped"] = np.concatenate([np.zeros((B, Pn, K), bool), np.asarray(g(r.topk_clamped))[:, :L]],
                                               1).astype(bool)
    return dict(
        tokens=np.concatenate([pt, np.asarray(g(r.tokens))[:, :L]], 1).astype(np.int32),
        attention_mask=np.concatenate([pm, np.asarray(g(r.response_mask))[:, :L]], 1),
        topk_ids=np.concatenate([prompt_ids, np.asarray(g(r.topk_ids))[:, :L]], 1).astype(np.int32),
        topk_ytil=np.concatenate([np.zeros((B, Pn, K), np.float32), np.asarray(g(r.topk_ytil))[:, :L]], 1),
        soft_mask=np.concatenate([np.zeros((B, Pn), bool), np.asarray(g(r.soft_mask))[:, :L]], 1),
        loss_mask=np.concatenate([np.zeros((B, Pn), bool), np.asarray(g(r.response_mask))[:, :L]], 1),
        advantages=np.asarray(advantages, np.float32),
        tau=np.asarray(g(r.tau), np.float32),
        **slots,
    )


def split_micro(batch: dict[str, np.ndarray], n_micro: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [n_micro, B / n_micro, ...]."""
    out = {}
    for k, v in batch.items():
        B = v.shape[0]
        if B % n_micro:
            raise ValueError(f"batch of {B} rows does not split into {n_micro} micro-batches")
        out[k] = v.reshape((n_micro, B // n_micro) + v.shape[1:])
    return out


def token_budget_groups(batch: dict[str, np.ndarray], max_tokens: int, n_devices: int = 1, *, granule: int = 64,
                        prompt_width: int | None = None, known=(),
                        new_shape_cost: float = 0.0) -> list[dict[str, np.ndarray]]:
    """A mini-batch (rows of a ``rollout_to_batch`` batch) as token-budget micro-batches (``rl.batching``): one
    dict per micro-batch shape, arrays ``[n_micro, R, T, ...]``, R divisible by ``n_devices``, T a multiple of
    ``granule``. ``prompt_width`` (the batch's prompt columns, ``Rollout.prompt_tokens.shape[1]``): shared
    prompts where they process fewer token slots (``plan_token_budget``), each distinct prompt of a micro-batch
    computed once (``gather_prefix_micro_batches``' layout). ``known`` / ``new_shape_cost``: shapes ``(T, R)``
    compiled already, and what a new one costs (``plan_micro_batches``)."""
    plans = plan_token_budget(batch, max_tokens, n_devices, granule=granule, prompt_width=prompt_width,
                              known=known, new_shape_cost=new_shape_cost)
    return [gather_micro_batches(batch, p) if p.prompts is None else
            gather_prefix_micro_batches(batch, p, prompt_width) for p in plans]


def processed_slots(group: dict[str, np.ndarray]) -> tuple[int, int]:
    """(token slots a ``token_budget_groups`` group processes, real tokens among them): filler rows (no loss) and a
    micro-batch's repeated prompts count as padding."""
    mask = np.asarray(group["attention_mask"]).astype(bool)
    used = np.asarray(group["loss_mask"]).astype(bool).any(-1)  # filler rows score nothing
    processed, real = mask.size, int((mask & used[..., None]).sum())
    if "prefix_idx" in group:
        pm = np.asarray(group["prompt_mask"]).astype(bool)
        processed += pm.size
        for m in range(pm.shape[0]):
            u = np.unique(np.asarray(group["prefix_idx"])[m][used[m]])
            real += int(pm[m, u].sum())
    return processed, real


# ------------------------------------------------------------------------------------------------------ optimizer
def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Global-norm gradient clipping as ``torch.nn.utils.clip_grad_norm_`` does it (the seed's, through verl): every
    gradient times ``min(1, max_norm / (norm + 1e-6))``. ``update(..., grad_norm=n)`` takes a norm the caller has
    already computed (the update computes it for its skip test and metrics) instead of another pass over every
    gradient. The state is ``optax.clip_by_global_norm``'s (``EmptyState``), so optimizer checkpoints are the same.

    Not optax's own: it selects between ``t`` and ``(t / norm) * max_norm`` per element (and has no 1e-6), and on
    XLA:CPU that select-and-divide made SmolLM2's clip + AdamW step 0.26-0.29 s instead of 0.16 s (135M float32
    parameters, 2 cores; ``benchmarks/bench_cpu_update_ab.py --optimizer``)."""

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(lr: float, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip: float | None = 1.0,
                   schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0,
                   min_lr_ratio: float = 0.0) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on every parameter, as torch.optim.AdamW) after a global-norm clip."""
    if schedule == "constant":
        sched = optax.constant_schedule(lr) if not warmup_steps else optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps])
    elif schedule == "warmup_constant":
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)),
                                      optax.constant_schedule(lr)], [max(warmup_steps, 1)])
    elif schedule == "warmup_cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
                                                   end_value=lr * min_lr_ratio)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; use constant, warmup_constant or warmup_cosine")
    parts = [clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    loss: LossConfig
    n_micro: int


def _zero_terms(graphdef, cfg: LossConfig, params, mb, old_lp, ref_lp, normalizer):
    """Zeros in the structure of ``loss_fn``'s terms (scalars, whatever the batch shape)."""
    first = jax.tree.map(lambda a: a[0], (mb, old_lp, ref_lp))
    t0 = jax.eval_shape(lambda: loss_fn(params, first[0], first[1], first[2], cfg, normalizer=normalizer,
                                        graphdef=graphdef)[1])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t0)


def _accumulate(graphdef, cfg: LossConfig, params, mb, old_lp, ref_lp, normalizer, carry=None):
    """(gradient sum, term sums) over micro-batches [n_micro, mb, ...] of one shape (scanned), added to ``carry``
    (None: from zeros). ``normalizer``: the whole mini-batch's loss denominator, so that sums over any split of it
    into micro-batches are exact."""

    def micro(carry, xs):
        gacc, tacc = carry
        b, o, r = xs

        def f(p):
            return loss_fn(p, b, o, r, cfg, normalizer=normalizer, graphdef=graphdef)

        (_, terms), grads = jax.value_and_grad(f, has_aux=True)(params)
        gacc = jax.tree.map(jnp.add, gacc, grads)
        tacc = accumulate_terms(tacc, terms)
        return (gacc, tacc), None

    if carry is None:
        carry = (jax.tree.map(jnp.zeros_like, params), _zero_terms(graphdef, cfg, params, mb, old_lp, ref_lp,
                                                                   normalizer))
    (grads, terms), _ = jax.lax.scan(micro, carry, (mb, old_lp, ref_lp))
    return grads, terms


def _apply(tx, cfg: LossConfig, params, opt_state, grads, terms):
    """The optimiser step from accumulated gradients (skipped, and counted, when their norm is not finite)."""
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(gnorm)

    def step(_):
        updates, new_opt = tx.update(grads, opt_state, params, grad_norm=gnorm)
        return optax.apply_updates(params, updates), new_opt

    # a conditional, not a select of every parameter and moment between the new and old values: the skipped step
    # costs nothing and the taken one no extra pass over 3x the parameters (SmolLM2: ~0.3 s of a CPU update)
    new_params, new_opt = jax.lax.cond(finite, step, lambda _: (params, opt_state), None)
    metrics = finalize_metrics(terms, cfg)
    metrics["grad_norm"] = gnorm
    metrics["skipped"] = (~finite).astype(jnp.int32)
    return new_params, new_opt, metrics


def _update(graphdef, tx, settings: UpdateSettings, params, opt_state, mb, old_lp, ref_lp):
    """One optimiser update over a mini-batch given as micro-batches [n_micro, mb, ...] (scanned)."""
    cfg = settings.loss
    normalizer = loss_denominator(mb["loss_mask"].reshape((-1,) + mb["loss_mask"].shape[2:]), cfg)
    grads, terms = _accumulate(graphdef, cfg, params, mb, old_lp, ref_lp, normalizer)
    return _apply(tx, cfg, params, opt_state, grads, terms)


def _logprobs(graphdef, loss_cfg: LossConfig, params, mb):
    """token_logprobs over micro-batches [n_micro, mb, ...] (lax.map keeps one micro-batch live)."""
    model = nnx.merge(graphdef, params)

    def one(b):
        return token_logprobs(model, b, tau=b["tau"], temperature=loss_cfg.temperature, noise=loss_cfg.noise,
                              chunk_size=loss_cfg.chunk_size, discrete_from_ids=loss_cfg.discrete_from_ids,
                              score_mask=b.get("loss_mask"))

    return jax.lax.map(one, mb)


def make_update_fn(graphdef, tx, settings: UpdateSettings, mesh=None):
    """The jitted update (params and optimizer state donated); activations batch-sharded on ``mesh``. ``tx`` is any
    optax transformation; the update passes it the gradients' global norm as ``grad_norm=`` (used by
    ``make_optimizer``'s clip, ignored by transformations that take no extra arguments)."""
    tx = optax.with_extra_args_support(tx)
    return jax.jit(with_activation_sharding(mesh, functools.partial(_update, graphdef, tx, settings)),
                   donate_argnums=(0, 1), compiler_options=compiler_options(mesh_backend(mesh)) or None)


def make_accumulate_fn(graphdef, loss_cfg: LossConfig, mesh=None):
    """The jitted ``_accumulate`` for token-budget micro-batches (one call per micro-batch shape, the running sums
    donated)."""
    return jax.jit(with_activation_sharding(mesh, functools.partial(_accumulate, graphdef, loss_cfg)),
                   donate_argnames=("carry",), compiler_options=compiler_options(mesh_backend(mesh)) or None)


def make_apply_fn(tx, loss_cfg: LossConfig, mesh=None):
    """The jitted ``_apply`` (params and optimizer state donated)."""
    tx = optax.with_extra_args_support(tx)
    return jax.jit(functools.partial(_apply, tx, loss_cfg), donate_argnums=(0, 1),
                   compiler_options=compiler_options(mesh_backend(mesh)) or None)


def make_logprob_fn(graphdef, loss_cfg: LossConfig, mesh=None):
    return jax.jit(with_activation_sharding(mesh, functools.partial(_logprobs, graphdef, loss_cfg)),
                   compiler_options=compiler_options(mesh_backend(mesh)) or None)


class PolicyState:
    """Params + optimizer state + compiled update / log-prob functions over one mesh."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, loss_cfg: LossConfig, mesh,
                 ref_model: nnx.Module | None = None):
        self.graphdef, self.params = nnx.split(model)
        self.mesh = mesh
        self.tx = tx
        self.loss_cfg = loss_cfg
        self.param_shardings = state_shardings(self.params, mesh) if mesh is not None else None
        if ref_model is not None:
            self.ref_params = nnx.state(ref_model)
        else:
            self.ref_params = jax.tree.map(jnp.copy, self.params)
        self.opt_state = self._place_opt_state(tx.init(self.params))
        self._update_cache: dict[int, Callable] = {}
        self._accumulate_fn = self._apply_fn = None
        self._lp = make_logprob_fn(self.graphdef, loss_cfg, mesh)

    def _place_opt_state(self, opt_state):
        """Moments follow their parameter's sharding (eager zeros_like keeps it); scalars (step counts) are
        replicated over the mesh, so every leaf lives on the same devices."""
        if self.mesh is None:
            return opt_state
        rep = NamedSharding(self.mesh, P())

        def place(a):
            if isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == self.mesh:
                return a
            return jax.device_put(a, rep)

        return jax.tree.map(place, opt_state)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def batch_sharding(self, x: np.ndarray) -> Any:
        """Micro-batched arrays [n_micro, mb, ...]: split the mb axis over the data-parallel axes."""
        if self.mesh is None:
            return None
        spec = fit_spec(x.shape, P(None, BATCH_AXES, *([None] * (x.ndim - 2))), self.mesh)
        return NamedSharding(self.mesh, spec)

    def like_batch(self, a):
        """A log-prob array [n_micro, mb, T] laid out as ``put`` lays out the batch (an equivalent sharding is just
        relabelled): the update's inputs then have one sharding whichever pass made them, or none (placeholders),
        so they share its compiled program."""
        if a is None or self.mesh is None:
            return a
        return jax.device_put(a, self.batch_sharding(a))

    def put(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda a: host_to_global(a, self.batch_sharding(np.asarray(a))), tree)

    def logprobs(self, params, mb) -> jax.Array:
        return self._lp(params, mb)

    @property
    def logprob_fn(self) -> Callable:
        """The jitted log-prob pass ``(params, micro-batches) -> [n_micro, mb, T]`` (``.lower`` to inspect it)."""
        return self._lp

    def update_fn(self, n_micro: int) -> Callable:
        """The jitted update over ``n_micro`` micro-batches (compiled once per count and kept)."""
        fn = self._update_cache.get(n_micro)
        if fn is None:
            fn = make_update_fn(self.graphdef, self.tx, UpdateSettings(self.loss_cfg, n_micro), self.mesh)
            self._update_cache[n_micro] = fn
        return fn

    def update(self, mb, old_lp, ref_lp) -> dict:
        fn = self.update_fn(int(mb["tokens"].shape[0]))
        old_lp, ref_lp = self.like_batch(old_lp), self.like_batch(ref_lp)
        self.params, self.opt_state, metrics = fn(self.params, self.opt_state, mb, old_lp, ref_lp)
        return metrics

    def update_groups(self, groups, normalizer) -> dict:
        """One optimiser update over a mini-batch given as groups of micro-batches, each group one shape
        ``(mb [n, R, T, ...], old_lp, ref_lp)`` (token-budget micro-batches, ``token_budget_groups``);
        ``normalizer`` is the whole mini-batch's ``loss_denominator``. Gradients and terms are summed over the
        groups exactly as over one scan."""
        if not groups:
            raise ValueError("update_groups needs at least one group of micro-batches")
        if self._accumulate_fn is None:
            self._accumulate_fn = make_accumulate_fn(self.graphdef, self.loss_cfg, self.mesh)
            self._apply_fn = make_apply_fn(self.tx, self.loss_cfg, self.mesh)
        normalizer = jnp.asarray(normalizer, jnp.float32)
        carry = None
        for mb, old_lp, ref_lp in groups:
            old_lp, ref_lp = self.like_batch(old_lp), self.like_batch(ref_lp)
            if carry is None:  # zeros with the parameters' shardings; the terms' structure from the first group
                carry = (jax.tree.map(jnp.zeros_like, self.params),
                         _zero_terms(self.graphdef, self.loss_cfg, self.params, mb, old_lp, ref_lp, normalizer))
            carry = self._accumulate_fn(self.params, mb, old_lp, ref_lp, normalizer, carry=carry)
        self.params, self.opt_state, metrics = self._apply_fn(self.params, self.opt_state, *carry)
        return metrics


# ------------------------------------------------------------------------------------------------------ metrics
class MetricsLog:
    """JSONL (+ TensorBoard) metrics, written by process 0; on resume, later lines are dropped first."""

    def __init__(self, out_dir: str, *, tensorboard: bool = True, resume_step: int = 0):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.main = is_main_process()
        self.tb = None
        if not self.main:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if not isinstance(rec, dict):
                        continue
                    if rec.get("step", 0) <= resume_step and rec.get("kind", "train") == "train":
                        keep.append(line if line.endswith("\n") else line + "\n")
                    elif rec.get("kind") != "train" and rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # pragma: no cover
                self.tb = None

    def write(self, step: int, metrics: dict, kind: str = "train"):
        if not self.main:
            return
        rec = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if os.path.exists(self.path) else []


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file (lines cut by a kill, and anything but objects, skipped)."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _py(v):
    v = jax.device_get(v)
    if isinstance(v, np.ndarray):
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return v


# ------------------------------------------------------------------------------------------------------ checkpoints
# what tensorstore says when a checkpoint's files cannot be read (cut short, corrupt, gone), as against a checkpoint
# of other shapes, which orbax refuses before reading
_READ_ERRORS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "Error reading", "error while reading")


class UnreadableCheckpoint(Exception):
    """A checkpoint's files are damaged (the message is tensorstore's)."""


class Checkpointer:
    """orbax CheckpointManager over (params, opt_state, meta). Saves are atomic (orbax writes a temporary directory and
    renames it), so a kill mid-save leaves the previous checkpoint as the latest good one."""

    def __init__(self, directory: str, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.dir = os.path.abspath(directory)
        self.mgr = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                           enable_async_checkpointing=False),
            item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        ocp = self.ocp
        self.mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.mgr.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def missing_items(self, step: int) -> list[str]:
        """The items a finished save of ``step`` has and this one lacks (a damaged or hand-edited checkpoint)."""
        return [n for n in ("params", "opt_state", "meta") if not os.path.isdir(os.path.join(self.dir, str(step), n))]

    def read_meta(self, step: int) -> dict:
        """The step's metadata (step, seed, data position, the run's config) without reading any weights."""
        ocp = self.ocp
        return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, params, opt_state):
        ocp = self.ocp

        def abstract(t):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), t)

        pure = nnx.to_pure_dict(params)
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(pure)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises plain Exceptions too
            if any(m in str(e) for m in _READ_ERRORS):
                msg = " ".join(str(e).split()).split(" See full TensorStore")[0]  # (then the whole spec)
                raise UnreadableCheckpoint(msg[:240]) from None
            if isinstance(e, (ValueError, KeyError, TypeError)):
                raise ValueError(f"checkpoint {self.dir}/{step} does not match this model/optimizer: {e}") from None
            raise
        nnx.replace_by_pure_dict(params, out["params"])
        return params, out["opt_state"], out["meta"]

    def close(self):
        self.mgr.close()


class GracefulInterrupt:
    """Turns SIGINT / SIGTERM into a flag checked between steps (a second signal aborts at once)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[softgrpo] signal {signum}: finishing this step, saving a checkpoint, then stopping "
              f"(again to abort)", flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
