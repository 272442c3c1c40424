"""Per-computation XLA options for this project's jitted model code (decoding, log-probs, the update).

One knob today: whether XLA:CPU compiles dots into YNNPACK fusions (jaxlib 0.10's default) or leaves them to
its dot thunks (``xla_cpu_experimental_ynn_fusion_type=""``). On a 2-core AMD EPYC (Zen 3, AVX2/FMA, no bf16
units) Gumbel decoding of SmolLM2 ran 1.06-1.20x faster without the fusions (5 of 5 alternating pairs), the
float32 SofT-GRPO update ~1.05x (median of 13 alternating updates each; within the VM's run-to-run spread) and
the log-prob pass the same (benchmarks/RESULTS.md). On AMX Xeons nothing was measured without them,
so ``auto`` turns them off only on CPUs without bf16 units, the machine class it was measured on.

``Tuning.ynn_dots`` (default from ``$SOFTGRPO_YNN_DOTS``): ``auto``, ``on`` (XLA's default, no option passed),
``off`` (no YNNPACK dot fusions on any CPU). The option is passed per computation (``jax.jit(..., compiler_options=...)``), not through
``XLA_FLAGS``: XLA aborts the process on an unknown ``XLA_FLAGS`` entry, while an unknown compile option is an
error this module catches once (a probe compile) and then leaves the option out, so a jaxlib that renamed or
dropped the flag runs with its defaults.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import numpy as np

from softgrpo_jax.models.config import NATIVE_BF16_CPU_FLAGS, cpu_flags
from softgrpo_jax.ops.tuning import YNN_DOTS_ENV, YNN_MODES, tuning

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
__all__ = ["YNN_DOTS_ENV", "YNN_OPTION", "compiler_options", "jit", "mesh_backend", "option_supported"]


@functools.cache
def option_supported(name: str, value: str) -> bool:
    """Whether this jaxlib's CPU compiler accepts the compile option ``name=value`` (one tiny probe compile)."""
    try:
        x = jax.device_put(np.float32(0), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda a: a + 1, compiler_options={name: value}).lower(x).compile()
        return True
    except (RuntimeError, ValueError, TypeError):  # JaxRuntimeError "No such compile option: ...", or no CPU
        return False


def compiler_options(backend: str | None = None, *, flags: frozenset[str] | None = None,
                     mode: str | None = None) -> dict[str, str]:
    """The compile options for model computations on ``backend`` (default: JAX's default backend).

    ``mode`` defaults to ``Tuning.ynn_dots``; ``flags`` to this machine's CPU flags."""
    mode = (tuning().ynn_dots if mode is None else mode).strip().lower()
    if mode not in YNN_MODES:
        raise ValueError(f"{YNN_DOTS_ENV}={mode!r}: expected one of {', '.join(YNN_MODES)}")
    if (backend or jax.default_backend()) != "cpu" or mode == "on":
        return {}
    if mode == "auto" and NATIVE_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags):
        return {}
    if not option_supported(YNN_OPTION, ""):
        if mode == "off":
            warnings.warn(f"{YNN_DOTS_ENV}=off: this jaxlib has no compile option {YNN_OPTION}; using its defaults",
                          stacklevel=2)
        return {}
    return {YNN_OPTION: ""}


def mesh_backend(mesh) -> str | None:
    """The platform of a mesh's devices (None without a mesh: JAX's default backend)."""
    return None if mesh is None else mesh.devices.flat[0].platform


def jit(fun: Callable | None = None, **jit_kwargs: Any):
    """``jax.jit`` with :func:`compiler_options` for JAX's default backend, resolved at each call or ``.lower``
    (not at import, which would start the backend before the caller could configure it; and not once, so a changed
    ``Tuning.ynn_dots`` takes effect): one jitted function per set of options. Usable as ``@jit`` or
    ``@jit(static_argnames=...)``."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _LazyJit(fun, jit_kwargs)


class _LazyJit:
    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        self._fun, self._kw, self._jitted = fun, jit_kwargs, {}
        functools.update_wrapper(self, fun)

    def _get(self):
        opts = compiler_options()
        key = tuple(sorted(opts.items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._fun, compiler_options=opts or None, **self._kw)
        return self._jitted[key]

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get().lower(*args, **kwargs)
