"""Minimal safetensors reader/writer on NumPy (bfloat16 through ml_dtypes), so loading never needs torch.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes.
Reading memory-maps the file and yields one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

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
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of one file; arrays are read-only views of a memory map."""
    header, base = read_header(path)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        if base + b > size:
            raise SafetensorsError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        arr = mm[base + a: base + b].view(dt).reshape(info["shape"])
        yield name, arr


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    items = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dt = _NAMES.get(arr.dtype)
        if dt is None:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        items.append(arr)
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for arr in items:
            f.write(arr.tobytes())
