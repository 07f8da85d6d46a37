"""QLoRA's NF4: 4-bit NormalFloat codes, blocks of 64 weights with an absmax scale.

Each weight becomes the index of the nearest of 16 code values (bitsandbytes' `get_4bit_type
("nf4")`, quantiles of N(0, 1) scaled to [−1, 1], exact zero included) to ``x / absmax``;
``x̂ = absmax · code[q]``. Ties between two codes go to the lower one, as bitsandbytes'
decision tree (`x > midpoint`) does. Two codes per byte, the first in the high nibble (also
as bitsandbytes packs them). GGUF has no NF4 type, so `ggml_type` is None: the exporter
dequantises and writes another type.

* ``nf4``: block = absmax (fp32, 4 bytes) + 32 code bytes = 36 bytes per 64 weights, 4.5 bits/weight.
* ``nf4_dq`` (QLoRA's double quantisation): the absmaxes of the whole tensor, minus their mean,
  are quantised to int8 in blocks of 256 with an fp32 scale each (symmetric, round half to
  even; bitsandbytes uses its dynamic 8-bit map here instead). Per 64 weights: 1 byte + 32
  code bytes = 33 bytes, plus a tensor trailer of ceil(n_blocks / 256) fp32 scales and the
  fp32 mean: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits/weight. Codes are chosen against the
  *dequantised* absmax, the scale they will be multiplied by. Because the second-level
  blocks span rows, `nf4_dq` packs a whole tensor into one flat byte string (`row_local` is
  False): packed shape ``(n_blocks·33 + 4·ceil(n_blocks/256) + 4,)``.

On CPU, `BlockFormat.quantize` runs `kernels.c`'s mirror of `NF4._quantize_blocks` (the same
bytes); `nf4_dq` quantises in torch (its second-level scales span the tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from greentune.quant.block import BlockFormat

NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
DQ_BLOCK = 256


def _code(device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def encode(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float ``[n, 64]`` and scales ``[n, 1]`` → packed code bytes uint8 ``[n, 32]``."""
    code = _code(blocks.device)
    mid = (code[1:] + code[:-1]) / 2  # 15 decision boundaries
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    q = torch.bucketize(blocks / scale, mid, right=False).to(torch.uint8)  # x ≤ mid → lower code
    return (q[:, 0::2] << 4) | q[:, 1::2]


def decode(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Code bytes ``[n, 32]`` and scales ``[n, 1]`` → float32 ``[n, 64]``."""
    code = _code(codes.device)
    q = torch.stack([codes >> 4, codes & 0x0F], dim=2).reshape(codes.shape[0], -1).long()
    return code[q] * absmax


class NF4(BlockFormat):
    name, block_size, type_size = "nf4", 64, 36
    ggml_type = None

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        return torch.cat([absmax.contiguous().view(torch.uint8), encode(blocks, absmax)], dim=1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        absmax = blocks[:, :4].contiguous().view(torch.float32)
        return decode(blocks[:, 4:], absmax)


class NF4DoubleQuant(BlockFormat):
    name, block_size, type_size = "nf4_dq", 64, 33
    ggml_type = None
    row_local = False

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.type_size + 4 / DQ_BLOCK) / self.block_size

    def packed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        self._check_rows(shape[-1])
        nb = math.prod(shape) // self.block_size
        return (nb * self.type_size + 4 * math.ceil(nb / DQ_BLOCK) + 4,)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        packed = self.packed_shape(w.shape)
        blocks = w.detach().reshape(-1, self.block_size).to(torch.float32)
        nb = blocks.shape[0]
        absmax = blocks.abs().amax(dim=1)  # [nb]
        offset = absmax.mean()
        c = absmax - offset
        n2 = math.ceil(nb / DQ_BLOCK)
        c2 = torch.nn.functional.pad(c, (0, n2 * DQ_BLOCK - nb)).reshape(n2, DQ_BLOCK)
        s2 = c2.abs().amax(dim=1, keepdim=True) / 127  # [n2, 1]
        s2_safe = torch.where(s2 == 0, torch.ones_like(s2), s2)
        q2 = torch.round(c2 / s2_safe).clamp(-127, 127)
        absmax_hat = (q2 * s2 + offset).reshape(-1)[:nb, None]  # what decode will use
        body = torch.cat(
            [q2.reshape(-1)[:nb, None].to(torch.int8).view(torch.uint8), encode(blocks, absmax_hat)], dim=1
        )
        trailer = torch.cat([s2.reshape(-1), offset.reshape(1)]).contiguous().view(torch.uint8)
        out = torch.cat([body.reshape(-1), trailer])
        assert tuple(out.shape) == packed
        return out

    def dequantize(self, q: torch.Tensor, shape: Sequence[int], native: bool = False) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if tuple(q.shape) != self.packed_shape(shape):
            raise ValueError(
                f"{self.name}: packed shape {tuple(q.shape)} does not match "
                f"{self.packed_shape(shape)} for a tensor of shape {shape}"
            )
        nb = math.prod(shape) // self.block_size
        n2 = math.ceil(nb / DQ_BLOCK)
        body = q[: nb * self.type_size].reshape(nb, self.type_size)
        trailer = q[nb * self.type_size :].contiguous().view(torch.float32)
        s2, offset = trailer[:n2], trailer[n2]
        q2 = body[:, 0].contiguous().view(torch.int8).to(torch.float32)
        absmax = q2 * s2.repeat_interleave(DQ_BLOCK)[:nb] + offset
        return decode(body[:, 1:], absmax[:, None]).reshape(shape)
