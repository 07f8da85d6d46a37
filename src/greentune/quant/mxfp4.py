"""MXFP4 (OCP microscaling FP4), GGUF's `MXFP4` block type, and the Hub's gpt-oss layout of it.

GGUF / ggml block, 32 weights → 17 bytes (4.25 bits/weight):

* byte 0: ``e``, an E8M0 exponent; the block's scale is ``d = 2^(e-127) / 2``
  (`ggml_e8m0_to_fp32_half`; the halving pairs with the doubled code values below);
* bytes 1–16: 4-bit E2M1 codes, low nibble of byte j = weight j, high nibble = weight j+16;
  code c means ``kvalues[c] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)[c]``
  (E2M1 doubled); ``x̂ = d · kvalues[c]``.

Quantising (gguf-py's `quants.MXFP4.quantize_blocks`, byte for byte): ``e = floor(log2(amax))
- 2 + 127`` (0 for an all-zero block), then each weight takes the code whose ``d · kvalues``
is nearest (the first such code on a tie, as numpy's argmin).

The Hub's gpt-oss checkpoints (transformers' `quantization_config.quant_method: "mxfp4"`)
store each expert weight ``[E, out, in]`` as ``*_blocks uint8 [E, out, in/32, 16]`` and
``*_scales uint8 [E, out, in/32]``: the same E8M0 exponent and E2M1 codes, but weight 2j in
the low nibble of byte j and 2j+1 in the high one (transformers' `convert_moe_packed_tensors`),
and the scale ``2^(e-127)`` applied to undoubled values. `hub_to_ggml` / `ggml_to_hub`
reorder the nibbles (no arithmetic), as llama.cpp's converter does for gpt-oss.
"""

from __future__ import annotations

import torch

from greentune.quant.block import BlockFormat, GGMLQuantizationType, chunk_elements, map_chunks

KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponents → fp32 ``2^(e-127) / 2`` (bit-built, as ggml: e < 2 is subnormal)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)


class MXFP4(BlockFormat):
    name, block_size, type_size = "mxfp4", 32, 17
    ggml_type = GGMLQuantizationType.MXFP4

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # in row chunks: the nearest-code search holds 16 candidates per weight
        out = torch.empty((blocks.shape[0], self.type_size), dtype=torch.uint8, device=blocks.device)
        per_chunk = max(1, chunk_elements(blocks.device) // self.block_size)
        return map_chunks(self._quantize_chunk, blocks, out, per_chunk)

    def _quantize_chunk(self, blocks: torch.Tensor) -> torch.Tensor:
        amax = blocks.abs().amax(dim=1, keepdim=True)  # [n, 1]
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        e = torch.where(amax > 0, torch.floor(torch.log2(safe)) - 2 + 127, torch.zeros_like(amax))
        e = e.to(torch.int64).remainder(256).to(torch.uint8)  # numpy's astype(uint8)
        d = e8m0_half(e)  # [n, 1]
        k = torch.tensor(KVALUES, dtype=torch.float32, device=blocks.device)
        err = (d.unsqueeze(-1) * k - blocks.unsqueeze(-1)).abs()  # [n, 32, 16]
        code = err.argmin(dim=-1).to(torch.uint8)  # first minimum, as numpy
        qs = code[:, :16] | (code[:, 16:] << 4)
        return torch.cat([e, qs], dim=1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = e8m0_half(blocks[:, :1])
        qs = blocks[:, 1:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int64)  # [n, 32]
        k = torch.tensor(KVALUES, dtype=torch.float32, device=blocks.device)
        return k[codes] * d


def hub_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Hub MXFP4 ``blocks uint8 [..., G, 16]`` + ``scales uint8 [..., G]`` → GGUF MXFP4 bytes
    ``uint8 [..., G·17]`` of the same weights (a nibble reordering, no dequantisation)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} disagree")
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32] in weight order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = torch.cat([scales.unsqueeze(-1), qs], dim=-1)  # [..., G, 17]
    return out.flatten(-2)


def ggml_to_hub(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 bytes ``uint8 [..., G·17]`` → the Hub's ``(blocks [..., G, 16], scales [..., G])``."""
    b = packed.reshape(*packed.shape[:-1], -1, 17)
    scales, qs = b[..., 0], b[..., 1:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), scales.contiguous()


def float_view(shapes: dict[str, tuple], get):
    """(shapes, getter) of a checkpoint read as the float parameters its MXFP4 pairs encode
    (`float_shapes`), each such tensor dequantised on request, one tensor at a time: what the
    exporters of a Hub gpt-oss folder read. MXFP4 values re-quantise to themselves, so an
    `--quant mxfp4` GGUF of such a folder holds the checkpoint's own expert values."""

    from greentune.models.mxfp4_checkpoint import float_shapes
    from greentune.quant.formats import get_format

    view = float_shapes(shapes)
    encoded = {k for k in view if k not in shapes}

    def get_float(name: str) -> torch.Tensor:
        if name not in encoded:
            return get(name)
        E, inp, out = view[name]
        packed = hub_to_ggml(get(f"{name}_blocks"), get(f"{name}_scales"))
        return get_format("mxfp4").dequantize(packed, (E, out, inp)).transpose(1, 2).contiguous()

    return view, get_float
