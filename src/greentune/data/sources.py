"""Read training documents: `.jsonl`, `.txt`, a directory of `.txt`, `.parquet`/`.csv`
files, or a dataset (`DatasetSpec`: a Hub id, `save_to_disk` folder or parquet/CSV/JSON/arrow).

Each `.jsonl` line and each dataset row is one record, its shape detected per record
(see `greentune.data.shapes`). A `.txt` file is one document, whole: splitting on blank
lines would cut code apart. A directory is read as every `*.txt` under it (recursively,
hidden paths skipped), in sorted order, one document per file; empty files there are
skipped with a warning. Whitespace-only text records are skipped and counted in the log.

`iter_samples` yields documents one at a time (nothing holds the whole corpus);
`read_samples` is its list. Every problem the user can fix raises `UserError` with one line
naming the file and line, or the dataset and row. Each sample remembers its `origin`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from greentune.data.hf_datasets import DatasetSpec, iter_rows
from greentune.data.samples import ChatSample, PromptSample, Sample, TextSample
from greentune.data.shapes import SHAPES, parse_record
from greentune.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "ChatSample",
    "DataSource",
    "DatasetSpec",
    "PromptSample",
    "SHAPES",
    "Sample",
    "TextSample",
    "iter_samples",
    "parse_record",
    "read_samples",
    "source_label",
]

DataSource = str | Path | DatasetSpec
TABLE_SUFFIXES = (".parquet", ".csv")


def source_label(source: DataSource) -> str:
    """How errors and logs name a source."""
    return source.label() if isinstance(source, DatasetSpec) else str(source)


def read_samples(source: DataSource) -> list[Sample]:
    """All samples of `source`, in order (see `iter_samples`)."""
    samples = list(iter_samples(source))
    if not samples:
        raise UserError(f"{source_label(source)}: no training samples")
    return samples


def iter_samples(source: DataSource) -> Iterator[Sample]:
    """The samples of `source` one at a time, in order; raises `UserError` when there are none."""
    skipped = n = 0
    for sample in _records(source):
        if sample is None:
            skipped += 1
            continue
        n += 1
        yield sample
    if skipped:
        log.warning(
            "%s: skipped %d whitespace-only document%s",
            source_label(source),
            skipped,
            "" if skipped == 1 else "s",
        )
    if n == 0:
        is_file = not isinstance(source, DatasetSpec) and Path(source).is_file()
        why = f" ({skipped} whitespace-only document(s) skipped)" if skipped else ""
        raise UserError(
            f"{source_label(source)}: {'empty file, ' if is_file else ''}no training samples{why}"
        )


def _records(source: DataSource) -> Iterator[Sample | None]:
    if isinstance(source, DatasetSpec):
        label = source.label()
        for i, row in iter_rows(source):
            yield parse_record(row, f"{label} row {i}", source.columns)
        return
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        yield from _read_txt_dir(path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".txt":
        yield _read_txt(path, skip_empty=False)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        for i, row in iter_rows(DatasetSpec(dataset=str(path))):
            yield parse_record(row, f"{path} row {i}")
    else:
        raise UserError(
            f"{path}: unsupported data file; use .jsonl, .txt, .parquet, .csv or a directory of "
            ".txt files (other formats: data.train: {dataset: PATH})"
        )


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text (byte {err.start})") from None


def _read_txt(path: Path, skip_empty: bool) -> TextSample | None:
    text = _decode(path.read_bytes(), str(path))
    if not text.strip():
        if skip_empty:
            log.warning("%s: empty, skipped", path)
            return None
        raise UserError(f"{path}: empty file, no training samples")
    return TextSample(text=text, origin=str(path))


def _read_txt_dir(root: Path) -> Iterator[Sample]:
    files = sorted(
        p
        for p in root.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UserError(f"{root}: no .txt files in this directory")
    for p in files:
        sample = _read_txt(p, skip_empty=True)
        if sample is not None:
            yield sample


def _read_jsonl(path: Path) -> Iterator[Sample | None]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON: {err.msg}") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply to be a sample") from None
            yield parse_record(obj, where)
