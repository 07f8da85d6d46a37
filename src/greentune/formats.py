"""The names of every weight format greentune speaks, and nothing else (torch-free, like gguf-py's constants).

Two things are called "quant", and they get two names here:

* a **base format** (`BaseFormat`, the recipe's `method.quant_base`): how the frozen base is stored while it
  trains — `none` (the compute dtype), `q8_0`, `q4_0`, `q4_k` (GGUF block types) or `nf4` (QLoRA), `mxfp4`
  (gpt-oss's experts; the rest Q8_0);
* an **export quantisation** (`GgufQuant`, `MlxQuant`, the recipe's `export[].quant`): the preset a finished
  model is written in — GGUF `f32 | f16 | q8_0 | q4_0 | q4_k_m | mxfp4`, MLX `4bit | none`.

A GGUF export whose preset stores its matmuls in the base format the run trained in reuses the training
bytes (`gguf_base_format`: q8_0 ↔ q8_0, q4_0 ↔ q4_0, q4_k_m ↔ q4_k, mxfp4 ↔ mxfp4). The block-format
implementations live in `greentune.quant`; the planner's bits per weight are here so that `plan` needs no
torch.
"""

from __future__ import annotations

from typing import Literal, get_args

BaseFormat = Literal["none", "q8_0", "q4_0", "q4_k", "nf4", "mxfp4"]
BASE_FORMATS: tuple[str, ...] = get_args(BaseFormat)
DEFAULT_BASE_FORMAT: BaseFormat = "none"

ExportFormat = Literal["gguf", "mlx", "hf"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
DEFAULT_EXPORT_FORMAT: ExportFormat = "gguf"

GgufQuant = Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m", "mxfp4"]
GGUF_QUANTS: tuple[str, ...] = get_args(GgufQuant)
DEFAULT_GGUF_QUANT: GgufQuant = "q4_k_m"

MlxQuant = Literal["4bit", "none"]
MLX_QUANTS: tuple[str, ...] = get_args(MlxQuant)
DEFAULT_MLX_QUANT: MlxQuant = "4bit"
MLX_BITS = 4  # what `4bit` means
#: Names an MLX export treats as "not quantised" (`none`, and the float names a user may type).
MLX_UNQUANTISED = ("none", "f32", "f16", "fp16")

#: The export quantisations each export format accepts (hf: none), and its default (None: no choice).
EXPORT_QUANTS: dict[str, tuple[str, ...]] = {"gguf": GGUF_QUANTS, "mlx": MLX_QUANTS, "hf": ()}
DEFAULT_EXPORT_QUANT: dict[str, str | None] = {
    "gguf": DEFAULT_GGUF_QUANT,
    "mlx": DEFAULT_MLX_QUANT,
    "hf": None,
}

#: The base format whose block bytes a GGUF preset stores its matmuls in.
GGUF_BASE_FORMAT: dict[str, str] = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k", "mxfp4": "mxfp4"}

#: Bits per weight of a base's matmuls in each storage format (None: the compute dtype's own):
#: q8_0 8.5 (32 int8 + one f16 scale), q4_0 / q4_k 4.5, nf4 4.127 (4 + 8/64 for the double-quantised
#: absmax + 32/(64·256) for its scales, QLoRA).
BASE_BPW: dict[str, float | None] = {
    "bf16": 16.0,
    "fp16": 16.0,
    "fp32": 32.0,
    "none": None,
    "q8_0": 8.5,
    "q4_0": 4.5,
    "q4_k": 4.5,
    "nf4": 4.127,
    "mxfp4": 4.25,  # experts only (gpt-oss's MXFP4, 32 weights in 17 bytes); see NON_EXPERT_BPW
}
#: Formats for experts only: the other matmuls, the embedding and the head are stored at this rate
#: instead (mxfp4: Q8_0, as llama.cpp's MXFP4_MOE files and greentune's quant_base mxfp4).
NON_EXPERT_BPW: dict[str, float] = {"mxfp4": 8.5}
#: Bits per weight of each GGUF preset (most tensors, output head), for plans without a file:
#: Q8_0 = 34 bytes / 32 weights, Q4_0 = 18 / 32, Q4_K = 144 / 256 (4.5), Q6_K = 210 / 256;
#: Q4_K_M ≈ 4.85 overall (Q6_K for about half the attn_v / ffn_down tensors).
GGUF_NOMINAL_BITS: dict[str, tuple[float, float]] = {
    "f32": (32.0, 32.0),
    "f16": (16.0, 16.0),
    "q8_0": (8.5, 8.5),
    "q4_0": (4.5, 6.5625),
    "q4_k_m": (4.85, 6.5625),
    "mxfp4": (4.25, 8.5),
}


def gguf_base_format(gguf_quant: str | None) -> str | None:
    """The base format a GGUF preset (None: the default) stores its matmuls in, else None."""
    return GGUF_BASE_FORMAT.get(gguf_quant or DEFAULT_GGUF_QUANT)


def reuses_training_bytes(base_format: str, export_format: str, export_quant: str | None) -> bool:
    """Whether an export can write the base's training bytes as they are (a GGUF in the base's format)."""
    return export_format == "gguf" and gguf_base_format(export_quant) == base_format


def mlx_bits(export_quant: str | None) -> int | None:
    """The bits an MLX export quantises to (None: unquantised); the default is `4bit`."""
    return None if export_quant in MLX_UNQUANTISED else MLX_BITS


def choices(names, default: str | None = None) -> str:
    """`a | b | c (default)`, for help strings and messages."""
    return " | ".join(f"{n} (default)" if n == default else n for n in names)


#: The one help line for an export quantisation (recipe field and `greentune export --quant`).
EXPORT_QUANT_HELP = (
    f"gguf: {choices(GGUF_QUANTS, DEFAULT_GGUF_QUANT)}; mlx: {choices(MLX_QUANTS, DEFAULT_MLX_QUANT)}"
)
