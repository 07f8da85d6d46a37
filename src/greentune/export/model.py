"""One `export:` entry of a recipe (or one `greentune export`): a merged model to GGUF, MLX or HF."""

from __future__ import annotations

from pathlib import Path

from greentune.errors import user_os_error
from greentune.export import export, write_gguf, write_modelfile
from greentune.formats import DEFAULT_GGUF_QUANT, mlx_bits


def export_model(
    model,
    tokenizer,
    merged_dir: Path,
    out_dir: Path,
    fmt: str,
    export_quant: str | None,
    prequantized: dict | None = None,
) -> Path:
    """One `export:` entry: `fmt` in `export_quant` (`greentune.formats`; None: its default). GGUF from the
    in-memory merged model, so that `prequantized` (the base's training bytes, keyed by its state-dict names)
    is written byte for byte. A full disk or read-only `out_dir` is a `UserError` naming it (the writers leave
    no temporary file). A GGUF `out_dir` whose name ends in `.gguf` is the file itself; any other is a
    folder."""
    try:
        return _export_model(model, tokenizer, merged_dir, out_dir, fmt, export_quant, prequantized)
    except OSError as err:
        raise user_os_error(err, out_dir) from None


def _export_model(
    model,
    tokenizer,
    merged_dir: Path,
    out_dir: Path,
    fmt: str,
    export_quant: str | None,
    prequantized: dict | None,
) -> Path:
    if fmt == "gguf":
        quant = export_quant or DEFAULT_GGUF_QUANT
        source = model if model is not None else merged_dir
        gguf_path = out_dir if out_dir.suffix == ".gguf" else out_dir / f"model-{quant}.gguf"
        path = write_gguf(source, gguf_path, quant, tokenizer=tokenizer, prequantized=prequantized or None)
        write_modelfile(path, merged_dir)
        return path
    if fmt == "mlx":
        return export(merged_dir, out_dir, "mlx", bits=mlx_bits(export_quant))
    return export(merged_dir, out_dir, fmt)
