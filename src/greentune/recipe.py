"""The recipe: one YAML file, validated here and nowhere else.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is rejected
with its name and the keys that are allowed. Defaults are declared once, on the fields.
`load_recipe` turns every validation problem into one `UserError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from greentune.data.hf_datasets import BUILDERS, DatasetSpec
from greentune.errors import UserError
from greentune.formats import (
    DEFAULT_BASE_FORMAT,
    EXPORT_QUANT_HELP,
    EXPORT_QUANTS,
    BaseFormat,
    ExportFormat,
)

QuantBase = BaseFormat  # the recipe's `method.quant_base`: a base format (greentune.formats)
Target = Literal["attn", "mlp", "experts"]

# The defaults every module reads (the planner, the CLI, the adapters), declared once here.
LORA_RANK = 16
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.0
LORA_TARGETS: tuple[str, ...] = ("attn", "mlp")
MERGE_EVERY = 200  # ReLoRA steps between merge-and-restart
UPCYCLE_EXPERTS, UPCYCLE_TOP_K = 8, 2
SEQ_LEN = 512
BATCH_SIZE = 8
GRAD_ACCUM = 1
STEPS = 1000
REGION = "WORLD"
#: What `data.train` reads as in a recipe loaded with `need_data=False` that names no training data.
NO_DATA = Path("(no data given)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _source_kind(value) -> str:
    return "spec" if isinstance(value, (dict, DatasetSpec)) else "file"


# A data source: a path, or a mapping read as a `DatasetSpec` (errors then name its keys).
DataSource = Annotated[
    Annotated[Path, Tag("file")] | Annotated[DatasetSpec, Tag("spec")], Discriminator(_source_kind)
]
_SOURCE_TAGS = {"file", "spec"}


class DataConfig(_Strict):
    train: DataSource = Field(
        description=".jsonl / .parquet / .csv (records of the shapes in greentune.data.shapes), .txt, "
        "a folder of .txt, or {dataset: ORG/NAME or PATH, split, name, columns}"
    )
    eval: DataSource | None = Field(None, description="held-out data; default: a seeded split of `train`")
    max_seq_len: int = Field(
        SEQ_LEN, ge=8, description="tokens per row; must not exceed the model's positions"
    )
    pack: bool = Field(True, description="pack short samples into full rows")
    eval_fraction: float = Field(
        0.05, gt=0, lt=1, description="held-out share of train documents when eval is unset"
    )


class LoraConfig(_Strict):
    rank: int = Field(LORA_RANK, ge=1)
    alpha: float = Field(LORA_ALPHA, gt=0, description="update scale is alpha / rank")
    dropout: float = Field(LORA_DROPOUT, ge=0, lt=1)
    targets: list[Target] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class ReloraConfig(_Strict):
    merge_every: int = Field(MERGE_EVERY, ge=1, description="steps between merge-and-restart")
    optimizer_prune: float = Field(
        0.9, ge=0, le=1, description="fraction of LoRA Adam moments zeroed by magnitude"
    )
    restart_warmup: int = Field(20, ge=0, description="linear LR re-warm steps after each merge")


class MethodConfig(_Strict):
    quant_base: QuantBase = DEFAULT_BASE_FORMAT
    lora: LoraConfig = Field(default_factory=LoraConfig)
    relora: ReloraConfig | None = None


MAX_EXPERTS = 256  # the most any released MoE uses (DeepSeek-V3); bounds upcycling's allocation


class UpcycleConfig(_Strict):
    experts: int = Field(UPCYCLE_EXPERTS, ge=2, le=MAX_EXPERTS)
    top_k: int = Field(UPCYCLE_TOP_K, ge=1)

    @model_validator(mode="after")
    def _k_le_e(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        return self


class MoeConfig(_Strict):
    upcycle: UpcycleConfig | None = None
    aux_loss_coef: float = Field(0.0, ge=0)
    router: Literal["frozen", "full"] = "frozen"


class TrainConfig(_Strict):
    steps: int = Field(STEPS, ge=1)
    batch_size: int = Field(BATCH_SIZE, ge=1)
    grad_accum: int = Field(GRAD_ACCUM, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine/linear floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the frozen base, fsdp shards it over the ranks"
    )
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute each decoder layer in the backward instead of keeping its activations; "
        "auto: on when the planner's memory model says the run would not fit without it",
    )

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _auto_true_false(cls, value):
        if value not in (True, False, "auto"):
            raise ValueError("must be auto, true or false")
        return value


class EnergyConfig(_Strict):
    region: str = REGION
    pue: float | None = Field(None, ge=1.0)
    wue_onsite: float | None = Field(None, ge=0, description="litres per IT kWh")
    grid_g_per_kwh: float | None = Field(None, ge=0)
    offsite_l_per_kwh: float | None = Field(None, ge=0)
    budget_kwh: float | None = Field(None, gt=0)
    interval_steps: int = Field(10, ge=1, description="training steps per ledger line")
    measure_savings: bool = Field(True, description="time a short full fine-tune as the counterfactual")


class ExportConfig(_Strict):
    format: ExportFormat
    quant: str | None = Field(None, description=EXPORT_QUANT_HELP)

    @model_validator(mode="after")
    def _known_quant(self):
        allowed = {None, *EXPORT_QUANTS[self.format]}
        if self.quant not in allowed:
            names = ", ".join(sorted(a for a in allowed if a)) or "none"
            raise ValueError(f"quant {self.quant!r} is not one of {names} for format {self.format}")
        return self


class Recipe(_Strict):
    base_model: str = Field(description="a local Hugging Face model folder, or a Hub id ORG/NAME[@REVISION]")
    base_model_commit: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{40}$",
        description="the Hub commit a run resolved base_model to (written into the run's recipe.yaml); "
        "set it to pin",
    )
    name: str | None = Field(None, description="run name; default: the recipe file's stem")
    trust_remote_code: bool = False
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    moe: MoeConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    export: list[ExportConfig] = Field(default_factory=list)

    def dump(self) -> dict:
        """The resolved recipe as plain YAML-able data (paths as strings)."""
        return self.model_dump(mode="json")

    def identity(self) -> dict:
        """What makes two runs the same run: everything but the energy budget, the name and
        activation checkpointing (it changes memory, not results: a run may resume with it on)."""
        d = self.dump()
        d.pop("name", None)
        d["energy"].pop("budget_kwh", None)
        d["train"].pop("activation_checkpointing", None)
        return d


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Allowed keys at the parent of `loc`, for the unknown-key message."""
    cur: type[BaseModel] | None = model
    for part in loc[:-1]:
        if cur is None or isinstance(part, int):
            continue
        field = cur.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        cur = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if cur is None:
            args = getattr(ann, "__args__", ())
            inner = [getattr(a, "__args__", ()) for a in args]
            for group in inner:
                cur = (
                    next((a for a in group if isinstance(a, type) and issubclass(a, BaseModel)), None) or cur
                )
    return sorted(cur.model_fields) if cur is not None else []


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if p not in _SOURCE_TAGS)
    key = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        allowed = _field_names(Recipe, loc)
        return f"{source}: unknown key '{key}' (allowed here: {', '.join(allowed)})"
    if e["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    if e["type"] == "value_error" and str(e["ctx"]["error"]).startswith("must "):
        return f"{source}: {key} {e['ctx']['error']}, got {e.get('input')!r}"
    return f"{source}: {key}: {e['msg']} (got {e.get('input')!r})"


def recipe_from_dict(
    data: dict, source: str = "recipe", base_dir: Path | None = None, need_data: bool = True
) -> Recipe:
    """Validate a recipe dict; relative data/model paths resolve against `base_dir`.

    `need_data=False` (the planner, a finished run): a recipe without `data` / `data.train` is
    valid, its `data.train` then reads as `NO_DATA`; nothing is ever read from the data paths."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping of keys, got {type(data).__name__}")
    if not need_data and isinstance(data.get("data") or {}, dict) and "train" not in (data.get("data") or {}):
        data = {**data, "data": {**(data.get("data") or {}), "train": str(NO_DATA)}}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(err, source)) from None
    if base_dir is not None:
        recipe = _resolve_paths(recipe, base_dir)
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    def fix(p):
        return p if p is None or p == NO_DATA or Path(p).is_absolute() else (base_dir / p).resolve()

    def fix_source(src):
        if not isinstance(src, DatasetSpec):
            return fix(src)
        local = Path(src.dataset).expanduser()
        looks_local = (
            src.dataset.startswith((".", "~"))
            or local.suffix.lower() in BUILDERS
            or (base_dir / local).exists()
        )
        if local.is_absolute() or not looks_local:
            return src  # absolute, or a Hub dataset id
        return src.model_copy(update={"dataset": str(fix(local))})

    data = recipe.data.model_copy(
        update={"train": fix_source(recipe.data.train), "eval": fix_source(recipe.data.eval)}
    )
    base = recipe.base_model
    if base.startswith((".", "/")) or (base_dir / base).exists():
        base = str(fix(Path(base)))
    return recipe.model_copy(update={"data": data, "base_model": base})


def load_recipe(path: str | Path, need_data: bool = True) -> Recipe:
    """Read and validate a recipe YAML file (one clear line on any problem); `need_data=False`:
    see `recipe_from_dict`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a recipe (binary, not UTF-8 text)") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    recipe = recipe_from_dict(data, source=str(path), base_dir=path.resolve().parent, need_data=need_data)
    if recipe.name is None:
        recipe = recipe.model_copy(update={"name": path.stem})
    return recipe
