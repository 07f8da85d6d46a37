"""Checkpoints that ship their experts in MXFP4 (the Hub's gpt-oss: `quantization_config.quant_method
"mxfp4"`, each expert weight stored as `*_blocks` + `*_scales` uint8 tensors).

greentune reads such a checkpoint with its own streaming loader (`quant.loading`), never with
transformers' MXFP4 quantizer (which wants GPU kernels, or dequantises every expert to bf16):
with ``quant_base: mxfp4`` the bytes go into the expert stores as they are (a nibble
reordering, `quant.mxfp4.hub_to_ggml`), with a block format each expert is dequantised and
re-quantised on its own. Unquantised training of such a checkpoint would hold every expert
in floats; it is refused in one line naming the quant_base to use.

`float_shapes` states the checkpoint's tensors as the float parameters they stand for, so
the completeness checks (names, shapes, before any weight is read) apply unchanged.
"""

from __future__ import annotations

from greentune.errors import UserError

SUFFIXES = ("_blocks", "_scales")


def is_mxfp4(config) -> bool:
    qc = (
        config.get("quantization_config")
        if isinstance(config, dict)
        else getattr(config, "quantization_config", None)
    )
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower() == "mxfp4"


def drop_quantization_config(config) -> None:
    """Forget the checkpoint's MXFP4 declaration (in place), so the model transformers builds
    and the `merged/` config it saves describe float weights."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def check_quant_base(config, quant_base: str) -> None:
    if is_mxfp4(config) and quant_base == "none":
        raise UserError(
            "this checkpoint ships its experts in MXFP4; train it with method.quant_base: mxfp4 "
            "(the bytes as shipped) or a block format such as q4_k (unquantised training of an MXFP4 "
            "checkpoint is not supported)"
        )


def float_shapes(headers: dict[str, tuple]) -> dict[str, tuple]:
    """{name: shape} with each `X_blocks [E, out, G, 16]` / `X_scales [E, out, G]` pair replaced
    by the float parameter `X` it encodes, transformers' gpt-oss shape [E, in = 32·G, out]."""
    out = {k: v for k, v in headers.items() if not k.endswith(SUFFIXES)}
    for k, shape in headers.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            if f"{base}_scales" not in headers:
                raise UserError(f"MXFP4 checkpoint has {k} but no {base}_scales")
            if len(shape) != 4 or shape[-1] != 16:
                raise UserError(f"MXFP4 tensor {k} has shape {tuple(shape)}, expected [E, out, in/32, 16]")
            E, rows, groups, _ = shape
            out[base] = (E, groups * 32, rows)
        elif k.endswith("_scales") and f"{k[: -len('_scales')]}_blocks" not in headers:
            raise UserError(f"MXFP4 checkpoint has {k} but no {k[: -len('_scales')]}_blocks")
    return out
