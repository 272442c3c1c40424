"""Every performance knob of the model code in one frozen :class:`Tuning`.

The knobs change how a program is built (tile sizes, which written-out VJP runs, which XLA options), never what it
computes beyond float rounding. They are read while JAX traces, so a knob changed after a function compiled would be
silently ignored by JAX's caches; :func:`set_tuning` (and :func:`use_tuning`) therefore clears those caches whenever
the tuning actually changes after it has been read: the next call retraces under the new values.

The two environment variables give the defaults of their knobs (read once, when the tuning is first needed):
``SOFTGRPO_YNN_DOTS`` (``ynn_dots``) and ``SOFTGRPO_SOFT_EMBED_IMPL`` (``soft_embed_impl``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Mapping

import jax

from softgrpo_jax.distributed import current_activation_mesh

YNN_DOTS_ENV = "SOFTGRPO_YNN_DOTS"
SOFT_EMBED_ENV = "SOFTGRPO_SOFT_EMBED_IMPL"
YNN_MODES = ("auto", "on", "off")
SOFT_EMBED_IMPLS = ("", "auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the model code is built. Defaults are the measured choices (see ``benchmarks/RESULTS.md``)."""

    # float32 logits alive at once in the vocabulary-chunked log-prob when no chunk size is given
    vocab_chunk_bytes: int = 128 * 2**20
    # single-device XLA:CPU: (rows per chunk, vocabulary columns per block) of the vocabulary log-prob; None: one
    # block of the whole vocabulary (chunks of ~vocab_chunk_bytes), as on other backends
    vocab_block: tuple[int, int] | None = (1024, 2048)
    # a 16-bit layer scan on XLA:CPU saves its residuals as uint16 bits (ops/residuals.py)
    residuals_as_bits: bool = True
    # a float32 layer scan on XLA:CPU without remat saves only its weight GEMMs' outputs
    save_only_dots_f32: bool = True
    # the fused attention block (ops/attention_block.py) for 16-bit whole-sequence passes on single-device XLA:CPU
    attention_block: bool = True
    # tokens per tile of the SwiGLU MLP on single-device XLA:CPU (ops/mlp.py); 0: the plain path
    mlp_tile_rows: int = 512
    # (batch rows, query positions) per attention tile; None: chosen from the shapes (ops/attention.py)
    attention_tiles: tuple[int, int] | None = None
    # jax.nn.dot_product_attention's implementation for attention="cudnn" ("xla" runs the same path on CPU)
    dpa_implementation: str = "cudnn"
    # trace the accelerators' paths on XLA:CPU too (no CPU-only tiling): what ``softgrpo plan`` compiles
    accelerator_paths: bool = False
    # XLA:CPU's YNNPACK dot fusions: auto (off on CPUs without bf16 units), on, off (softgrpo_jax/xla_options.py)
    ynn_dots: str = "auto"
    # what soft_embed(impl="auto") picks: "" / "auto" by backend, or forced "xla" / "pallas"
    soft_embed_impl: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ynn_dots", self.ynn_dots.strip().lower())
        object.__setattr__(self, "soft_embed_impl", self.soft_embed_impl.strip().lower())
        if self.ynn_dots not in YNN_MODES:
            raise ValueError(f"Tuning.ynn_dots={self.ynn_dots!r}: expected one of {', '.join(YNN_MODES)}")
        if self.soft_embed_impl not in SOFT_EMBED_IMPLS:
            raise ValueError(f"Tuning.soft_embed_impl={self.soft_embed_impl!r}: expected 'xla', 'pallas' or 'auto'")
        if self.mlp_tile_rows < 0 or self.vocab_chunk_bytes <= 0:
            raise ValueError("Tuning: mlp_tile_rows must be >= 0 and vocab_chunk_bytes > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Tuning":
        """The defaults, with the knobs that have an environment variable taken from it."""
        env = os.environ if environ is None else environ
        ynn = env.get(YNN_DOTS_ENV, "auto").strip().lower()
        if ynn not in YNN_MODES:
            raise ValueError(f"{YNN_DOTS_ENV}={ynn!r}: expected one of {', '.join(YNN_MODES)}")
        impl = env.get(SOFT_EMBED_ENV, "").strip().lower()
        if impl not in SOFT_EMBED_IMPLS:
            raise ValueError(f"{SOFT_EMBED_ENV}={impl!r}: expected 'xla', 'pallas' or 'auto'")
        return cls(ynn_dots=ynn, soft_embed_impl=impl)


_lock = threading.Lock()
_state: dict = {"tuning": None, "read": False}


def tuning() -> Tuning:
    """The tuning in force (read at trace time by the model code)."""
    with _lock:
        if _state["tuning"] is None:
            _state["tuning"] = Tuning.from_env()
        _state["read"] = True
        return _state["tuning"]


def set_tuning(new: Tuning | None = None, **changes) -> Tuning:
    """Replace the tuning (``new``, or the current one with ``changes``); returns the previous one. If it differs
    from a tuning already read by a trace, JAX's caches are cleared so that nothing compiled under the old values
    is reused. ``set_tuning(None)`` goes back to the defaults from the environment."""
    with _lock:
        old = _state["tuning"] or Tuning.from_env()
        base = new if new is not None else (old if changes else Tuning.from_env())
        value = dataclasses.replace(base, **changes) if changes else base
        changed = value != old
        _state["tuning"] = value
        stale = changed and _state["read"]
        if stale:
            _state["read"] = False
    if stale:
        jax.clear_caches()
    return old


@contextlib.contextmanager
def use_tuning(new: Tuning | None = None, **changes):
    """``set_tuning`` for the duration of a ``with`` block, then back to the previous tuning."""
    old = set_tuning(new, **changes) if (new is not None or changes) else tuning()
    try:
        yield tuning()
    finally:
        set_tuning(old)


def accelerator_paths():
    """Within this context, programs traced on XLA:CPU take the paths of the accelerator backends (no CPU-only
    tiling). ``softgrpo plan`` compiles under it, so a one-device plan on a CPU host reports the memory of the
    accelerator's program, not of the CPU's blocked and tiled one."""
    return use_tuning(accelerator_paths=True)


def cpu_single_device() -> bool:
    """XLA:CPU without a multi-device activation mesh, outside ``accelerator_paths``: where the CPU-only paths
    (tiled transposes, loops over batch or token tiles) run. Under a multi-device mesh they would break GSPMD's
    batch sharding (``tests/test_plan.py`` caught the update's temporaries doubling under fsdp)."""
    mesh = current_activation_mesh()
    return jax.default_backend() == "cpu" and (mesh is None or mesh.size == 1) and not tuning().accelerator_paths


def tiles_ok(*dims: int) -> bool:
    """The CPU tiled transposes apply: single-device XLA:CPU and every dim a multiple of 8."""
    return cpu_single_device() and all(d % 8 == 0 for d in dims)
