"""A run directory's layout: the one place its file names are spelled (torch-free).

run = RunDir("runs/x")
run.recipe_file, run.ledger, run.checkpoints, run.gguf("q4_k_m")   # paths
recipe = run.read_recipe()                                         # the run's validated `Recipe`

runs/x/
  recipe.yaml               the resolved recipe the run trained (read back by plan, eval, export, report)
  .greentune                greentune's marker (ownership.py); .greentune.lock while a command holds it
  data-identity.json        what the token cache was built from (data_identity.py)
  metrics.jsonl             one line per logged step (train/loop.py)
  ledger.jsonl              metered energy, one line per interval and phase (energy/ledger.py)
  checkpoints/              step-NNNNNN folders (train/checkpoint.py)
  upcycled/                 the dense base turned MoE, when the recipe upcycles
  adapter/                  the PEFT LoRA adapter
  merged/                   the merged Hugging Face model
  trained-base.safetensors  the quantised base's block bytes, so a GGUF in that format reuses them
  export/                   model-<quant>.gguf (+ .Modelfile), model-mlx-4bit/, model-hf/
  summary.json              the run's outcome; savings.json: the full fine-tune counterfactual
  calibration.json          this run's speed and power as a planner calibration
  report.json, report.html  `greentune report`
"""

from __future__ import annotations

from pathlib import Path

import yaml

from greentune.errors import UserError
from greentune.formats import DEFAULT_GGUF_QUANT
from greentune.recipe import Recipe, recipe_from_dict


class RunDir:
    """The paths of one run directory (nothing is read or created until asked)."""

    RECIPE = "recipe.yaml"
    MARKER = ".greentune"
    LOCK = ".greentune.lock"
    DATA_IDENTITY = "data-identity.json"
    METRICS = "metrics.jsonl"
    LEDGER = "ledger.jsonl"
    CHECKPOINTS = "checkpoints"
    UPCYCLED = "upcycled"
    ADAPTER = "adapter"
    MERGED = "merged"
    TRAINED_BYTES = "trained-base.safetensors"
    EXPORT = "export"
    SUMMARY = "summary.json"
    SAVINGS = "savings.json"
    CALIBRATION = "calibration.json"
    REPORT_JSON = "report.json"
    REPORT_HTML = "report.html"
    #: What a fresh (not resumed) run removes from an earlier attempt in the same folder.
    STALE_ON_RESTART = (LEDGER, METRICS, SAVINGS, SUMMARY)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def _p(name: str):  # noqa: N805 - a property factory, used in the class body only
        return property(lambda self: self.path / name)

    recipe_file = _p(RECIPE)
    marker = _p(MARKER)
    lock = _p(LOCK)
    data_identity = _p(DATA_IDENTITY)
    metrics = _p(METRICS)
    ledger = _p(LEDGER)
    checkpoints = _p(CHECKPOINTS)
    upcycled = _p(UPCYCLED)
    adapter = _p(ADAPTER)
    merged = _p(MERGED)
    trained_bytes = _p(TRAINED_BYTES)
    export = _p(EXPORT)
    summary = _p(SUMMARY)
    savings = _p(SAVINGS)
    calibration = _p(CALIBRATION)
    report_json = _p(REPORT_JSON)
    report_html = _p(REPORT_HTML)
    del _p

    def gguf(self, quant: str | None = None) -> Path:
        """The GGUF a run exports in preset `quant` (default q4_k_m): export/model-<quant>.gguf."""
        return self.export / f"model-{quant or DEFAULT_GGUF_QUANT}.gguf"

    def ggufs(self) -> list[Path]:
        """The GGUFs the run has exported, sorted by name."""
        return sorted(self.export.glob("*.gguf"))

    def has_recipe(self) -> bool:
        """A run dir is a folder holding a `recipe.yaml` (what eval, export and report look for)."""
        return self.recipe_file.is_file()

    def has_merged(self) -> bool:
        return (self.merged / "config.json").is_file()

    def read_recipe_data(self) -> dict:
        """The run's `recipe.yaml` as a plain mapping; a corrupt one is a `UserError` naming it
        (greentune wrote it, so anything else means the file was damaged)."""
        path = self.recipe_file
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, RecursionError, yaml.YAMLError):
            raise UserError(f"{path}: corrupt run recipe (not valid YAML)") from None
        if not isinstance(data, dict) or not isinstance(data.get("method", {}), dict):
            raise UserError(f"{path}: corrupt run recipe (not a mapping)")
        return data

    def read_recipe(self) -> Recipe:
        """The run's validated `Recipe`, as written (paths already resolved; data not required,
        since a finished run is evaluated or exported without its training files)."""
        path = self.recipe_file
        try:
            return recipe_from_dict(self.read_recipe_data(), source=str(path), need_data=False)
        except UserError as err:
            if "corrupt run recipe" in str(err):
                raise
            raise UserError(f"{err} (a corrupt run recipe)") from None
