"""The one safetensors header parser: every structural rule checked, so corruption is one line.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
tensor bytes. The JSON is an object: ``__metadata__`` (optional, string → string) and, per
tensor, ``{"dtype": str, "shape": [int ≥ 0, ...], "data_offsets": [begin, end]}`` relative to
the end of the header. The tensors must tile the data area exactly: sorted by ``begin``, the
first starts at 0, each starts where the previous ended, ``end - begin`` is the shape's element
count times the dtype's size, and the last ends at the end of the file.

The Rust reader refuses such files too, but with a panic or an untyped exception deep inside
a load; reading the header here first turns every such case (a JSON list, overflowing shapes,
negative or overlapping offsets, non-string metadata, an unknown dtype, a truncated file) into
a `UserError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError

MAX_HEADER_BYTES = 100_000_000  # the Rust reader's own limit

# Bytes per element of every dtype the safetensors format defines (sub-byte float types excluded).
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors by name, the metadata, and where the data area starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


class _Bad(ValueError):
    pass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info) -> TensorEntry:
    if not isinstance(info, dict):
        raise _Bad(f"tensor {name!r}: entry is a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _Bad(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _Bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _Bad(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise _Bad(
            f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
            f"its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _parse(path: Path) -> Header:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _Bad("file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise _Bad(f"header length {n} does not fit a {size}-byte file")
        text = f.read(n)
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _Bad("header JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise _Bad(f"header is a JSON {type(obj).__name__}, not an object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Bad("__metadata__ must map strings to strings")
    tensors = {name: _entry(name, info) for name, info in obj.items()}
    position = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != position:
            what = "overlaps the previous tensor" if t.begin < position else "leaves a gap before it"
            raise _Bad(f"tensor {name!r} starts at {t.begin}, {what} (which ends at {position})")
        position = t.end
    if 8 + n + position != size:
        raise _Bad(f"tensors end at byte {8 + n + position} but the file has {size}")
    return Header(tensors, metadata, 8 + n)


def read_header(path: str | Path) -> Header:
    """The validated header of the safetensors file at `path`; UserError naming the file otherwise."""
    path = Path(path)
    try:
        return _parse(path)
    except (_Bad, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
