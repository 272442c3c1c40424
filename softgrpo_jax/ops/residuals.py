"""Names for the values a layer's backward pass keeps, and the ``jax.checkpoint`` policies that use them.

The values a layer's backward pass needs are named for ``jax.checkpoint``'s ``save_only_these_names`` policy. A bf16
layer scan on XLA:CPU runs under that policy: without remat (``SAVE_POLICY``) it saves the residuals a plain backward
saves, with remat (``REMAT_POLICY``) only each layer's input, and either way 16-bit floats are stored as their uint16
bits. A residual saved in bf16 is stacked across the scan by a bf16 dynamic-update-slice, which XLA:CPU computes in
float32 (30 ms per layer for a [16, 256, 1536] slice), and the backward scan then converts each whole stack to
float32 (1.2 s for one [30, 16, 256, 1536] residual); the same bits as uint16 are updated and sliced in place, and
only bitcasts are recomputed. SmolLM2 update, 16 x 256 tokens, bf16 without remat: 24-25 -> ~10 s; with remat 1-4%
faster (benchmarks/RESULTS.md). ``Tuning.residuals_as_bits`` switches it off.

A float32 layer scan on XLA:CPU without remat saves only its weight GEMMs' outputs for the backward pass
(``dots_with_no_batch_dims_saveable``: q, k, v, the attention output projection's input, gate, up) and recomputes
the rest in the backward scan: the norms, RoPE, the SwiGLU and the attention's scores and probabilities. What a plain
backward saves is stacked across the scan (zero-filled, copied in, copied out: ~6 GB for the SmolLM2 update at
16 x 256 tokens); recomputing the cheap part instead ran that update 1.09x faster (median of 6 alternating updates
each, 2-core AMD EPYC). ``Tuning.save_only_dots_f32`` switches it off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from softgrpo_jax.ops.tuning import tuning


RESIDUAL = "softgrpo_residual"
LAYER_INPUT = "softgrpo_layer_input"
# the attention block's output and softmax statistics (``attention_block``): saved under remat too, so the
# recomputed layer forward skips the attention
ATTENTION_SAVED = "softgrpo_attention_saved"
SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT, RESIDUAL, ATTENTION_SAVED)
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT, ATTENTION_SAVED)


def named_residual(a: jax.Array, name: str = RESIDUAL) -> jax.Array:
    """``a`` named as a residual worth saving: 16-bit floats by their bits (see ``RESIDUAL``), value unchanged."""
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2:
        bits = checkpoint_name(jax.lax.bitcast_convert_type(a, jnp.uint16), name)
        return jax.lax.bitcast_convert_type(bits, a.dtype)
    return checkpoint_name(a, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def saved_residual(a: jax.Array, name: str = RESIDUAL) -> jax.Array:
    """Identity whose value is saved for the backward pass under ``SAVE_POLICY`` (a GEMM's input or output that a
    backward needs, a norm's input): without the mark, that policy would recompute it. Inert elsewhere."""
    return a


saved_residual.defvjp(lambda a, name: (named_residual(a, name), None), lambda name, _, g: (g,))


def residual_marks(remat: bool, scanned: bool, dtype) -> str | None:
    """Which residuals a layer marks for the checkpoint policies: "input" (remat) or "all" for a 16-bit layer scan
    on XLA:CPU (``Tuning.residuals_as_bits``), None elsewhere (the marks force 16-bit rounding where XLA could
    otherwise keep excess precision, so unmarked passes stay as they are)."""
    bits = (tuning().residuals_as_bits and scanned and jnp.dtype(dtype).itemsize == 2
            and jax.default_backend() == "cpu")
    return None if not bits else "input" if remat else "all"


def checkpoint_layer(body, marks: str | None, remat: bool, scanned: bool, dtype):
    """``body`` (one layer) under the checkpoint policy for these settings (see the module docstring)."""
    if remat:
        return jax.checkpoint(body, policy=REMAT_POLICY if marks else jax.checkpoint_policies.nothing_saveable)
    if marks:
        return jax.checkpoint(body, policy=SAVE_POLICY)
    if (tuning().save_only_dots_f32 and scanned and jnp.dtype(dtype).itemsize == 4
            and jax.default_backend() == "cpu"):
        return jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return body
