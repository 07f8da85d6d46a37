"""`greentune export RUN_DIR|MODEL_DIR --format gguf|mlx|hf [--quant Q] [--out DIR|FILE.gguf]`.

The target may also be a Hub id (`ORG/NAME[@REVISION]`, resolved through the HF cache).
`--out` ending in `.gguf` is the GGUF file to write (its Ollama Modelfile goes beside it);
any other `--out` is a folder.

A run dir exports its `merged/` model. When the run trained on a quantised base in the
GGUF format asked for (q8_0 ↔ q8_0, q4_0 ↔ q4_0, q4_k ↔ q4_k_m), the base tensors are
written from the run's saved training bytes, byte for byte, not quantised a second time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from greentune.errors import UserError
from greentune.export.gguf_families import family_of
from greentune.export.model import export_model
from greentune.export.trained_bytes import load_trained_bytes
from greentune.formats import reuses_training_bytes
from greentune.fsutil import remove_stale_temps
from greentune.models.loader import (
    check_model_dir,
    check_weights_match,
    load_config,
    load_tokenizer,
    resolve_model_dir,
)
from greentune.recipe import ExportConfig
from greentune.run_dir import RunDir


def export_target(target: Path, fmt: str, quant: str | None, out: Path | None) -> list[Path]:
    try:
        item = ExportConfig(format=fmt, quant=quant)
    except ValidationError as err:
        raise UserError(f"--quant: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    run = RunDir(target)
    if run.has_recipe():
        model_dir = run.merged
        if not run.has_merged():
            raise UserError(f"{target}: the run has no merged/ model yet (did it finish?)")
        base_format = run.read_recipe().method.quant_base
        out = out or run.export
        trained = run.trained_bytes
        prequantized = (
            load_trained_bytes(trained)
            if reuses_training_bytes(base_format, item.format, item.quant) and trained.exists()
            else None
        )
    else:
        model_dir, prequantized = resolve_model_dir(target), None
        from_hub = model_dir != target  # a Hub id: the default output goes in the working folder
        out = out or (
            Path(target.name.split("@")[0] + "-export")
            if from_hub
            else target.with_name(target.name + "-export")
        )
    _check_out(out, item.format)
    check_model_dir(model_dir)
    remove_stale_temps(out)  # what an export killed mid-write left (greentune's own temp names only)
    config = load_config(model_dir)
    if item.format == "gguf":  # a family llama.cpp cannot run: one line before the weights are read
        family_of(config.to_dict())
    check_weights_match(model_dir, config)  # the writers stream tensors: check them first
    tokenizer = load_tokenizer(model_dir)
    # the writer streams the folder (the training bytes matched to its tensor names): a whole
    # float model in memory may not fit (a 14.8 B model is 59 GB in float32)
    return [export_model(None, tokenizer, model_dir, out, item.format, item.quant, prequantized)]


def _check_out(out: Path, fmt: str) -> None:
    """A `.gguf` name is a file: only for GGUF, and not where a folder already is."""
    if out.suffix != ".gguf":
        return
    if fmt != "gguf":
        raise UserError(
            f"--out {out}: a name ending in .gguf is a GGUF file, but --format is {fmt}; "
            "give a folder for mlx or hf"
        )
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name ending in .gguf or another folder")
