"""Loading a frozen base in the format it trains in (`greentune.formats.BASE_FORMATS`)."""

from __future__ import annotations

from torch import nn

from greentune.formats import DEFAULT_BASE_FORMAT
from greentune.models.loader import load_model
from greentune.quant.loading import load_quantized


def load_base(
    model_dir: str, base_format: str, device, trust_remote_code: bool = False, progress: bool = False
) -> nn.Module:
    """The model at `model_dir` on `device`: in the compute dtype (`none`), or quantised to
    `base_format` as its checkpoint streams in, one weight at a time (with a bar: minutes at size)."""
    if base_format != DEFAULT_BASE_FORMAT:
        return load_quantized(model_dir, base_format, progress=progress).to(device)
    return load_model(model_dir, device=device, trust_remote_code=trust_remote_code)
