"""Rows from the `datasets` library: a Hub dataset id, a `save_to_disk` folder, or local
parquet / CSV / JSON / arrow files.

A recipe names one as `{dataset: ORG/NAME | PATH, split: train, name: CONFIG, columns: {...}}`;
a bare `.parquet` or `.csv` data path is read the same way. Loading is `datasets`' own, so its
cache (`HF_DATASETS_CACHE`), offline mode (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`) and
login apply unchanged; only rows are yielded, one at a time, so the table stays memory-mapped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from greentune.data.shapes import KNOWN_KEYS
from greentune.errors import UserError

log = logging.getLogger(__name__)

# file suffix → the `datasets` builder that reads it
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


class DatasetSpec(BaseModel):
    """`data.train` / `data.eval` given as a dataset rather than a file path."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="Hub dataset id ORG/NAME, a save_to_disk folder, or a parquet/CSV/JSON/arrow path"
    )
    split: str = Field("train", description="which split to read")
    name: str | None = Field(None, description="the dataset's configuration (subset), when it has several")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="your column name → greentune's key (text, prompt, completion, "
        "messages, conversations, instruction, input, output)",
    )

    @field_validator("columns")
    @classmethod
    def _known_targets(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(v for v in columns.values() if v not in KNOWN_KEYS)
        if unknown:
            raise ValueError(
                f"maps onto unknown key(s) {', '.join(unknown)}; keys are {', '.join(KNOWN_KEYS)}"
            )
        return columns

    def label(self) -> str:
        return f"{self.dataset}" + (f" ({self.name})" if self.name else "") + f"[{self.split}]"


def iter_rows(spec: DatasetSpec) -> Iterator[tuple[int, dict]]:
    """`(row number, row)` for every row of the split, read a batch at a time."""
    ds = load_split(spec)
    i = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield i, dict(zip(keys, values))
            i += 1


def content_fingerprint(spec: DatasetSpec) -> str:
    """`datasets`' own fingerprint of the loaded split (changes with its files and transforms)."""
    return load_split(spec)._fingerprint


def load_split(spec: DatasetSpec):
    """The `datasets.Dataset` a spec names (one line on any failure the user can fix)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.logging.set_verbosity_error()
    path = Path(spec.dataset).expanduser()
    label = spec.label()
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise UserError(f"{label}: no split {spec.split!r} (splits: {', '.join(ds)})")
                ds = ds[spec.split]
            return ds
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(
                    f"{path}: unsupported dataset file; use {', '.join(BUILDERS)}, a save_to_disk "
                    "folder or a Hub dataset id"
                )
            # CSV cells are text: no guessing " 2" into the number 2, nor "" into NaN
            options = (
                dict(features=_csv_text_features(path), keep_default_na=False) if builder == "csv" else {}
            )
            return datasets.load_dataset(
                builder, data_files={spec.split: str(path)}, split=spec.split, **options
            )
        if path.is_dir() or spec.dataset.startswith((".", "/", "~")) or spec.dataset.count("/") != 1:
            if not path.exists():
                raise UserError(f"{spec.dataset}: no such file or directory (nor a Hub dataset id ORG/NAME)")
        return datasets.load_dataset(spec.dataset, spec.name, split=spec.split)
    except UserError:
        raise
    except DatasetNotFoundError as err:
        raise UserError(
            f"{label}: {_first_line(err)} (log in with `hf auth login` for a private or gated "
            "dataset; offline, it must already be in the datasets cache)"
        ) from None
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f"{label}: not in the datasets cache, and offline mode (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE) forbids downloading it; load it once online, or give a local "
                "file or folder"
            ) from None
        raise UserError(
            f"{label}: the Hugging Face Hub cannot be reached ({_first_line(err)}); check the "
            "connection, or give a local file or folder"
        ) from None
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise UserError(f"{label}: cannot be loaded ({type(err).__name__}: {_first_line(err)})") from None


def _csv_text_features(path: Path):
    """Every column of a CSV file (named by its header row) typed as a string."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
