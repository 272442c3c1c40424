"""What a rollout produces: the :class:`Rollout` record, its work counters (:class:`RolloutStats`), the decode
loop's output buffers, and the joining of rollouts of consecutive row ranges (the waves of one ``generate``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from softgrpo_jax.distributed import BATCH_AXES, fit_spec

FINISH_LENGTH, FINISH_STOP, FINISH_COLD_STOP = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop", FINISH_COLD_STOP: "cold_stop"}


@flax.struct.dataclass
class Rollout:
    """What one generation call produced (B rows, P prompt slots, L = max_new_tokens, K slots).

    Response step j of row b: ``tokens[b, j]`` was emitted; ``topk_ids[b, j]`` / ``topk_ytil[b, j]`` are the K ids and
    perturbed log-probs stored for it (docs/algorithm.md, "Stored quantities"; one-hot ``[tok, 0, ...]`` and ytil 0 for discrete steps);
    ``weights[b, j]`` the input mixture of the next step; ``soft_mask`` marks soft steps. ``topk_kept[b, j]`` marks
    the slots whose token the filters kept (p_hat > 0; the others hold the next-ranked tokens at probability 0) and
    ``topk_clamped[b, j]`` the slots whose Gumbel noise lies on or beyond the log-density's clip: the trainer
    renormalises over kept slots only and passes no gradient through clamped ones (docs/algorithm.md, deviations).
    Both are None in a Rollout built without them (the trainer then uses every slot, and the clip as it falls).
    """

    prompt_tokens: jax.Array  # [B, P] int32, left-padded with pad_id
    prompt_mask: jax.Array  # [B, P] bool
    tokens: jax.Array  # [B, L] int32, right-padded with pad_id
    response_mask: jax.Array  # [B, L] bool: up to and including the stop token
    topk_ids: jax.Array  # [B, L, K] int32
    topk_ytil: jax.Array  # [B, L, K] float32
    weights: jax.Array  # [B, L, K] float32
    soft_mask: jax.Array  # [B, L] bool
    logprobs: jax.Array  # [B, L] float32 rollout log-probs (logging only)
    lengths: jax.Array  # [B] int32 response lengths
    think_lengths: jax.Array  # [B] int32 steps up to and including the end of thinking (0 for discrete rows)
    finish_reason: jax.Array  # [B] int32: 0 length, 1 stop token, 2 cold stop abort
    modes: jax.Array  # [B] int32 row modes
    tau: jax.Array  # [B] float32: the tau that rebuilds each row's soft inputs from topk_ytil
    topk_kept: jax.Array | None = None  # [B, L, K] bool: the filters kept the slot's token (slot 0 at discrete steps)
    topk_clamped: jax.Array | None = None  # [B, L, K] bool: the slot's noise is on or beyond the clip [-1.5, 3]
    stats: "RolloutStats | None" = flax.struct.field(pytree_node=False, default=None)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class RolloutStats:
    """Work counters of one ``generate`` call, summed over its decode steps: row-steps computed (every row of the
    batch, each step the loop ran) against useful (the rows' response tokens), and KV-cache slots read by decode
    attention against the slots that held the row's own context."""

    steps: int
    row_steps_computed: int
    row_steps_useful: int
    kv_slots_read: int
    kv_slots_valid: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)



def _batch_spec(mesh, shape):
    return NamedSharding(mesh, fit_spec(shape, P(BATCH_AXES, *([None] * (len(shape) - 1))), mesh))



def _valid_slots(plen: np.ndarray, lengths: np.ndarray) -> int:
    """KV slots that held a row's own context, summed over its decode steps (its prompt, then the steps so far)."""
    plen, lengths = plen.astype(np.int64), lengths.astype(np.int64)
    return int((lengths * plen + lengths * (lengths + 1) // 2).sum())


def _empty_buffers(B: int, steps: int, K: int, pad_id: int) -> dict:
    """A decode's output buffers [B, steps(, K)] before any step."""
    return dict(tokens=jnp.full((B, steps), pad_id, jnp.int32), mask=jnp.zeros((B, steps), bool),
                ids=jnp.zeros((B, steps, K), jnp.int32), ytil=jnp.zeros((B, steps, K), jnp.float32),
                weights=jnp.zeros((B, steps, K), jnp.float32), kept=jnp.zeros((B, steps, K), bool),
                clamped=jnp.zeros((B, steps, K), bool), soft=jnp.zeros((B, steps), bool),
                logprob=jnp.zeros((B, steps), jnp.float32))


@functools.partial(jax.jit, static_argnames=("B", "steps", "K", "pad_id", "mesh"))
def _full_buffers(B: int, steps: int, K: int, pad_id: int, mesh=None):
    """The rollout's empty buffers that the chunks write into, split over the batch axes."""
    out = _empty_buffers(B, steps, K, pad_id)
    if mesh is not None:
        out = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, _batch_spec(mesh, a.shape)), out)
    return out


_LEFT_PADDED = ("prompt_tokens", "prompt_mask")


@functools.partial(jax.jit, static_argnames=("width", "steps", "pad_id", "mesh"))
def _concat_fields(parts, *, width: int, steps: int, pad_id: int, mesh=None):
    """Each field of the ``parts`` (dicts of a Rollout's arrays) concatenated over rows: prompts left-padded to
    ``width`` columns, per-step fields right-padded to ``steps`` (pad_id tokens, zeros / False elsewhere)."""
    out = {}
    for name in parts[0]:
        arrs = []
        for f in parts:
            a = f[name]
            if a.ndim >= 2:
                left = name in _LEFT_PADDED
                widths = [(0, 0)] * a.ndim
                widths[1] = (width - a.shape[1], 0) if left else (0, steps - a.shape[1])
                a = jnp.pad(a, widths, constant_values=pad_id if name in ("prompt_tokens", "tokens") else 0)
            arrs.append(a)
        x = jnp.concatenate(arrs, 0)
        out[name] = x if mesh is None else jax.lax.with_sharding_constraint(x, _batch_spec(mesh, x.shape))
    return out


def concat_rollouts(parts: Sequence["Rollout"], pad_id: int, mesh=None) -> "Rollout":
    """The rollouts of consecutive row ranges (the waves of one ``generate`` call) as one, laid out as one call
    would lay them out: prompts left-padded to the widest, responses right-padded to the longest budget; work
    counters summed."""
    if len(parts) == 1:
        return parts[0]
    names = [f.name for f in dataclasses.fields(Rollout) if f.name != "stats"]
    present = [k for k in names if all(getattr(r, k) is not None for r in parts)]
    fields = _concat_fields(tuple({k: getattr(r, k) for k in present} for r in parts),
                            width=max(r.prompt_tokens.shape[1] for r in parts),
                            steps=max(r.tokens.shape[1] for r in parts),
                            pad_id=int(pad_id), mesh=mesh)
    stats = None
    if all(r.stats is not None for r in parts):
        stats = RolloutStats(*(sum(getattr(r.stats, f.name) for r in parts)
                               for f in dataclasses.fields(RolloutStats)))
    return Rollout(**{k: fields.get(k) for k in names}, stats=stats)
