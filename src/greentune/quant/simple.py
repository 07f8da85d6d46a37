"""The one-scale block formats, GGUF's Q8_0 and Q4_0, and the unquantised F32/F16 fallbacks.

Bytes equal gguf-py's `gguf.quants.quantize` (itself bit-exact with ggml's
`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`):

* Q8_0, 32 weights → 34 bytes (8.5 bits/weight): ``d = amax / 127`` stored as f16, then
  ``q = roundf(x / d)`` (half away from zero) as int8; ``x̂ = d · q``.
* Q4_0, 32 weights → 18 bytes (4.5 bits/weight): ``d = max / -8`` where `max` is the signed
  weight of largest magnitude, stored as f16; ``q = min(15, trunc(x / d + 8.5))``, low
  nibbles hold weights 0–15, high nibbles 16–31; ``x̂ = d · (q − 8)``.

On CPU, `BlockFormat.quantize` runs `kernels.c`'s mirrors of the Q8_0/Q4_0 `_quantize_blocks`
(the same bytes).
"""

from __future__ import annotations

import torch

from greentune.quant.block import BlockFormat, GGMLQuantizationType, f16_bytes, f16_from_bytes, safe_inverse


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C `roundf`: half away from zero, computed as gguf-py's `np_roundf` does (exactly)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _d(blocks: torch.Tensor) -> tuple[torch.Tensor]:
    """The f16 scale in bytes 0–1 of each block → fp32 ``[n, 1]`` (the `prep` of Q8_0 and Q4_0)."""
    b = blocks[:, 0:2].to(torch.int32)
    return (f16_from_bytes(b[:, 0:1], b[:, 1:2]),)


def _q8_0_expand(blocks: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).to(torch.float32) * d


def _q4_0_expand(blocks: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    qs = blocks[:, 2:].to(torch.int32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32).sub(8) * d


class Q8_0(BlockFormat):
    name, block_size, type_size = "q8_0", 32, 34
    ggml_type = GGMLQuantizationType.Q8_0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = blocks.abs().amax(dim=1, keepdim=True) / 127  # [n, 1]
        q = _round_half_away(blocks * safe_inverse(d))  # [n, 32] in [-127, 127]
        return torch.cat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return _q8_0_expand(blocks, *_d(blocks))


class Q4_0(BlockFormat):
    name, block_size, type_size = "q4_0", 32, 18
    ggml_type = GGMLQuantizationType.Q4_0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        imax = blocks.abs().argmax(dim=1, keepdim=True)  # first of equal maxima
        d = torch.gather(blocks, 1, imax) / -8  # [n, 1]
        q = torch.trunc(blocks * safe_inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)
        return torch.cat([f16_bytes(d), packed], dim=1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return _q4_0_expand(blocks, *_d(blocks))


class F32(BlockFormat):
    """Unquantised fp32, stored as GGUF F32: the fallback for rows no block format fits."""

    name, block_size, type_size = "f32", 1, 4
    ggml_type = GGMLQuantizationType.F32

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.uint8)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


class F16(BlockFormat):
    """IEEE half, stored as GGUF F16 (round to nearest even)."""

    name, block_size, type_size = "f16", 1, 2
    ggml_type = GGMLQuantizationType.F16

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(torch.float16).view(torch.uint8)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).to(torch.float32)
