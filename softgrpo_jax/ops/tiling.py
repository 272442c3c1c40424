"""Helpers for loops over tiles on XLA:CPU, which computes 16-bit float data movement in float32: moving the same
bits as uint16 keeps slices and updates in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_rows(fn, bb, *xs):
    """``fn`` over tiles of ``bb`` batch rows of the arrays (pytrees) ``xs`` (``lax.map``; 16-bit floats cross the
    loop as uint16 bits: XLA:CPU computes a bf16 dynamic-slice / -update-slice in float32, converting whole
    arrays), results merged back. One tile: ``fn(*xs)``."""
    B = jax.tree.leaves(xs)[0].shape[0]
    if bb >= B:
        return fn(*xs)

    def body(args):
        return jax.tree.map(to_bits, fn(*jax.tree.map(from_bits, args, tiles)))

    tiles = jax.tree.map(lambda x: jax.ShapeDtypeStruct((bb,) + x.shape[1:], x.dtype), xs)
    out = jax.lax.map(body, jax.tree.map(lambda x: to_bits(x).reshape((B // bb, bb) + x.shape[1:]), xs))
    return jax.tree.map(lambda a, ref: from_bits(a.reshape((B,) + a.shape[2:]), ref), out, jax.eval_shape(fn, *tiles))


def to_bits(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def from_bits(a, ref):
    return jax.lax.bitcast_convert_type(a, ref.dtype) if a.dtype != ref.dtype else a  # ref: the original dtype


def update_slots(buf: jax.Array, upd: jax.Array, index) -> jax.Array:
    """``dynamic_update_slice`` of one layer's cache that stays in place for 16-bit floats: XLA:CPU computes bf16 /
    f16 ops in f32, which turns a bf16 update into convert -> update -> convert of the whole cache every step; the
    same bits as uint16 are updated in place (a bitcast on every backend). Only for per-layer caches: on the
    layer-stacked cache carried by a scan, the bitcast costs a copy of the whole stack instead (measured with
    ``softgrpo plan``), so that path uses a plain update."""
    if buf.dtype.itemsize == 2 and jnp.issubdtype(buf.dtype, jnp.floating):
        bits = jax.lax.bitcast_convert_type
        out = jax.lax.dynamic_update_slice(bits(buf, jnp.uint16), bits(upd, jnp.uint16), index)
        return bits(out, buf.dtype)
    return jax.lax.dynamic_update_slice(buf, upd, index)
