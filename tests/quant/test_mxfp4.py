"""MXFP4: greentune's bytes are gguf-py's reference quantiser's, byte for byte; the Hub's
gpt-oss nibble layout converts to them without arithmetic (checked against transformers'
own dequantiser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from greentune.quant.formats import get_format
from greentune.quant.mxfp4 import ggml_to_hub, hub_to_ggml


def _weights(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[0] = 0.0  # an all-zero block row
    w[1, :32] = torch.tensor([0.25, -0.75] * 16)  # exact ties between codes
    return w


def test_bytes_equal_gguf_reference():
    from gguf import GGMLQuantizationType, quants

    w = _weights()
    ours = get_format("mxfp4").quantize(w).numpy()
    ref = quants.quantize(w.numpy(), GGMLQuantizationType.MXFP4)
    assert ours.shape == ref.shape == (64, 256 // 32 * 17)
    assert np.array_equal(ours, ref)
    back = get_format("mxfp4").dequantize(torch.from_numpy(ours), w.shape).numpy()
    np.testing.assert_array_equal(back, quants.dequantize(ref, GGMLQuantizationType.MXFP4))
    assert get_format("mxfp4").bits_per_weight == 4.25


def test_hub_layout_round_trips_and_matches_transformers_dequantiser():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = _weights(rows=2 * 32, cols=64).reshape(2, 32, 64)  # [E, out, in]
    packed = get_format("mxfp4").quantize(w)  # [E, out, in/32*17]
    blocks, scales = ggml_to_hub(packed)
    assert blocks.shape == (2, 32, 2, 16) and scales.shape == (2, 32, 2)
    assert torch.equal(hub_to_ggml(blocks, scales), packed)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    ours = get_format("mxfp4").dequantize(packed, w.shape)
    torch.testing.assert_close(theirs.transpose(1, 2), ours, rtol=0, atol=0)


def test_row_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        get_format("mxfp4").quantize(torch.zeros(2, 48))
