"""The registry of block formats: name → format.

    >>> fmt = get_format("q4_k")
    >>> q = fmt.quantize(w)                  # float [..., K] → uint8 [..., K // 256 * 144]
    >>> w_hat = fmt.dequantize(q, w.shape)   # → float32

Names: ``q8_0``, ``q4_0``, ``q4_k``, ``q6_k`` (GGUF's block types, bytes as GGUF stores them),
``mxfp4`` (GGUF's MXFP4, gpt-oss's expert format),
``nf4``, ``nf4_dq`` (QLoRA's NormalFloat, without/with double quantisation of the scales),
and ``f16``, ``f32`` (unquantised; the fallback for rows no block format fits).
"""

from __future__ import annotations

from greentune.errors import UserError
from greentune.quant.block import BlockFormat
from greentune.quant.mxfp4 import MXFP4
from greentune.quant.nf4 import NF4, NF4DoubleQuant
from greentune.quant.q4_k import Q4_K
from greentune.quant.q6_k import Q6_K
from greentune.quant.simple import F16, F32, Q4_0, Q8_0

_REGISTRY: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        Q8_0(),
        Q4_0(),
        Q4_K(),
        Q6_K(),
        NF4(),
        NF4DoubleQuant(),
        F16(),
        F32(),
        MXFP4(),
    )
}


def format_names() -> list[str]:
    """All registered format names."""
    return list(_REGISTRY)


def get_format(name: str | BlockFormat) -> BlockFormat:
    """The format called `name` (case-insensitive); a `BlockFormat` is returned as is.

    Raises:
        UserError: for an unknown name, listing the known ones.
    """
    if isinstance(name, BlockFormat):
        return name
    fmt = _REGISTRY.get(str(name).lower())
    if fmt is None:
        raise UserError(f"unknown quantisation format {name!r}; known: {', '.join(_REGISTRY)}")
    return fmt


def fallback_format(fmt: BlockFormat, row_length: int) -> BlockFormat:
    """The format to store rows of `row_length` in when `fmt` would be asked for.

    `fmt` itself when its blocks fit; otherwise Q8_0 when rows are a multiple of 32, else F32
    (llama.cpp likewise falls back to another type for rows that are not whole blocks).
    """
    if fmt.fits(row_length):
        return fmt
    q8 = _REGISTRY["q8_0"]
    return q8 if q8.fits(row_length) else _REGISTRY["f32"]
