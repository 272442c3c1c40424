"""safetensors files through the ``safetensors`` package (its NumPy framework: bfloat16 as ``ml_dtypes.bfloat16``),
so loading never needs torch.

Reading opens a file with ``safetensors.safe_open`` and yields one tensor at a time; the package checks the header
(a JSON object of ``{dtype, shape, data_offsets}``, offsets that match each shape and cover the file exactly), so a
truncated or malformed file fails before any tensor is used. Its errors become :class:`SafetensorsError`, a
``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
from typing import Iterator

import ml_dtypes
import numpy as np

from softgrpo_jax.checkpoint.errors import CheckpointError
from softgrpo_jax.errors import os_errno_in
from softgrpo_jax.fs import default_file_mode

# dtypes this project reads and writes (the NumPy framework holds these)
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_WRITABLE = frozenset(_DTYPES.values())


class SafetensorsError(CheckpointError):
    """A safetensors file that cannot be read (truncated, malformed header, unsupported dtype) or written."""


def _describe(path: str, e: BaseException) -> str:
    msg = str(e).strip().rstrip(".")
    hint = "re-download or re-export it" if os.path.isfile(path) else "check the path"
    return f"{path}: not a readable safetensors file ({msg}); {hint}"


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of one file, one at a time (each array is its own copy)."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, framework="numpy")
    except (SafetensorError, ValueError, TypeError) as e:
        raise SafetensorsError(_describe(path, e)) from None
    with f:
        for name in f.keys():
            try:
                dt = f.get_slice(name).get_dtype()
            except (SafetensorError, ValueError, TypeError) as e:
                raise SafetensorsError(_describe(path, e)) from None
            if dt not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dt}, which this project does not read "
                                       f"(supported: {', '.join(_DTYPES)}); convert the checkpoint to float32 or "
                                       f"bfloat16")
            try:
                arr = f.get_tensor(name)
            except (SafetensorError, ValueError, TypeError) as e:
                raise SafetensorsError(_describe(path, e)) from None
            yield name, arr


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (NumPy arrays, bfloat16 as ``ml_dtypes.bfloat16``) to one safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    out = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _WRITABLE:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype} to {path}")
        out[name] = arr
    try:
        save_file(out, path, metadata=dict(metadata or {"format": "pt"}))
    except SafetensorError as e:
        code = os_errno_in(e)
        if code is not None:  # a full disk, no permission: an OSError like any other write
            raise OSError(code, os.strerror(code), path) from None
        raise SafetensorsError(f"cannot write {path}: {e}") from None
    os.chmod(path, default_file_mode())  # the package writes 0600; an export is a plain file
