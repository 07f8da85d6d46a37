"""What `greentune eval TARGET` names: a run dir, a Hugging Face model folder, or a `.gguf` file.

A run dir's GGUF is the one file in `RUN/export/*.gguf` (with several, the caller names one
with `--gguf` or passes the file); a GGUF inside a run's `export/` belongs to that run, so
its measurement goes to the run's ledger too. The tokenizer that packs the held-out rows is
the run's (`merged/`), the model folder's, or, for a bare file, the one embedded in the GGUF
(converted by transformers), so both engines score the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError
from greentune.models.hub import is_hub_id
from greentune.models.loader import resolve_model_dir
from greentune.run_dir import RunDir


@dataclass(frozen=True)
class Target:
    """Where the model and its pieces are (any may be None)."""

    run_dir: Path | None
    model_dir: Path | None  # an HF folder PyTorch can load (merged/ or the folder itself)
    gguf: Path | None
    label: str | None = None  # what the user named, when that is not a path (a Hub id)


def _is_run(path: Path) -> bool:
    return RunDir(path).has_recipe()


def _run_gguf(run_dir: Path, quant: str | None) -> Path | None:
    files = RunDir(run_dir).ggufs()
    if quant:
        files = [f for f in files if f.stem.lower().endswith(quant.lower())]
    if len(files) > 1:
        raise UserError(
            f"{run_dir}/export has several GGUF files ({', '.join(f.name for f in files)}): "
            "pass one of them as the target, or --gguf QUANT"
        )
    return files[0] if files else None


def resolve_target(target: str | Path, quant: str | None = None) -> Target:
    """The run dir, model folder and GGUF that `target` names (UserError if it is none of them)."""
    path = Path(target)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is neither a run dir, a model folder nor a .gguf file")
        run = (
            path.parent.parent if path.parent.name == RunDir.EXPORT and _is_run(path.parent.parent) else None
        )
        model_dir = RunDir(run).merged if run is not None and RunDir(run).has_merged() else None
        return Target(run, model_dir, path)
    if not path.exists() and is_hub_id(target):
        return Target(None, resolve_model_dir(target), None, label=str(target))
    if not path.is_dir():
        raise UserError(f"no run dir, model folder or .gguf file at {path}")
    if _is_run(path):
        run = RunDir(path)
        return Target(path, run.merged if run.has_merged() else None, _run_gguf(path, quant))
    if (path / "config.json").is_file():
        exported = path.with_name(path.name + "-export")
        ggufs = sorted(exported.glob("*.gguf")) if exported.is_dir() else []
        return Target(None, path, ggufs[0] if len(ggufs) == 1 else None)
    raise UserError(f"{path} is not a run dir (no recipe.yaml) or a model folder (no config.json)")


def load_tokenizer_for(t: Target):
    """The tokenizer that defines the token ids both engines score."""
    from greentune.models.loader import load_tokenizer

    if t.model_dir is not None:
        return load_tokenizer(t.model_dir)
    if t.run_dir is not None:
        recipe = RunDir(t.run_dir).read_recipe()
        return load_tokenizer(resolve_model_dir(recipe.base_model, recipe.base_model_commit))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(t.gguf.parent), gguf_file=t.gguf.name)
    except Exception as err:  # transformers cannot convert this GGUF's vocabulary
        raise UserError(f"cannot read the tokenizer embedded in {t.gguf}: {err}") from None
