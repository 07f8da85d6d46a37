"""Export for laptops: GGUF (llama.cpp, Ollama, LM Studio), MLX (Apple silicon), merged HF.

write_gguf(model_dir, out_path, quant="q4_k_m")   # f32 | f16 | q8_0 | q4_0 | q4_k_m
write_modelfile(gguf_path, tokenizer)              # <stem>.Modelfile beside it, for Ollama
write_mlx(model_dir, out_dir, bits=4, group_size=64)
write_hf(model_or_dir, out_dir, tokenizer=...)
export(model_dir, out_dir, "gguf", quant="q4_k_m")  # one call per recipe `export:` entry
llamacpp.generate(gguf_path, "prompt", max_tokens=16)  # run it in llama.cpp (xllamacpp, optional)
"""

from __future__ import annotations

from pathlib import Path

from greentune.errors import UserError
from greentune.export import llamacpp
from greentune.export.gguf import GGUFSummary, export_gguf, write_gguf
from greentune.export.gguf_quant import QUANTS
from greentune.export.hf import validate_hf_dir, write_hf
from greentune.export.mlx import write_mlx
from greentune.export.modelfile import write_modelfile
from greentune.formats import DEFAULT_EXPORT_FORMAT, DEFAULT_GGUF_QUANT, MLX_BITS


def _gguf(model_dir, out_dir: Path, quant=DEFAULT_GGUF_QUANT, prequantized=None, name="model", **_):
    path = write_gguf(model_dir, out_dir / f"{name}-{quant}.gguf", quant, prequantized=prequantized)
    write_modelfile(path, model_dir)
    return path


def _mlx(model_dir, out_dir: Path, bits=MLX_BITS, group_size=64, name="model", **_):
    return write_mlx(
        model_dir, out_dir / (f"{name}-mlx-{bits}bit" if bits else f"{name}-mlx"), bits, group_size
    )


def _hf(model_dir, out_dir: Path, name="model", **_):
    return write_hf(model_dir, out_dir / f"{name}-hf")


FORMATS = {"gguf": _gguf, "mlx": _mlx, "hf": _hf}


def export(model_dir, out_dir, fmt: str = DEFAULT_EXPORT_FORMAT, **options) -> Path:
    """Export the HF model at `model_dir` into folder `out_dir` in format `fmt`; return what was written.

    gguf: `<name>-<quant>.gguf` + `<name>-<quant>.Modelfile` (options: quant, prequantized, name);
    mlx: folder `<name>-mlx-<bits>bit` (options: bits, group_size); hf: folder `<name>-hf`.
    """
    fn = FORMATS.get(fmt)
    if fn is None:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fn(model_dir, Path(out_dir), **options)


__all__ = [
    "FORMATS",
    "GGUFSummary",
    "QUANTS",
    "export",
    "export_gguf",
    "llamacpp",
    "validate_hf_dir",
    "write_gguf",
    "write_hf",
    "write_mlx",
    "write_modelfile",
]
