"""Quantised frozen base: GGUF block formats (Q8_0, Q4_0, Q4_K, Q6_K), QLoRA's NF4, and the
modules and loader that keep a model's frozen weights in them.

    from greentune.quant import (
        get_format, QuantLinear, QuantEmbedding, QuantExperts3D, quantize_model_, load_quantized
    )
"""

from greentune.quant.block import BlockFormat
from greentune.quant.embedding import QuantEmbedding, QuantTiedHead
from greentune.quant.experts import QuantExperts3D
from greentune.quant.formats import fallback_format, format_names, get_format
from greentune.quant.linear import QuantLinear
from greentune.quant.loading import load_quantized
from greentune.quant.replace import quantize_model_

__all__ = [
    "BlockFormat",
    "QuantEmbedding",
    "QuantExperts3D",
    "QuantLinear",
    "QuantTiedHead",
    "fallback_format",
    "format_names",
    "get_format",
    "load_quantized",
    "quantize_model_",
]
