"""Tokenise a corpus once, into memory-mapped files in a shared cache, and pack from there.

Two kinds of entry under `$GREENTUNE_CACHE/tokens/` (default ~/.cache/greentune), each a
folder written under a temporary name and renamed into place, so a reader never sees half
of one; when several processes (e.g. the ranks of a job) build the same entry at once, the
first rename wins and the others use it (the key fixes the content):

- `docs-<key>/`: every document of one data source, tokenised with its loss mask, as flat
  files: `ids.u32` (token ids), `mask.u8` (1 = a training target) and `offsets.i64`
  (document d is `[offsets[d], offsets[d+1])`). Keyed by the tokenizer (its whole
  serialised form and chat template), the source's *content* (the bytes of every file, or
  `datasets`' fingerprint of a split) and `FORMAT_VERSION` of the templates. The corpus
  streams through: documents are read, tokenised a batch at a time (the fast tokenizer
  encodes a batch on every core) and appended to the files, with a progress bar on a
  terminal; no list of all documents or all token ids exists at any point.
- `rows-<key>/`: the packed `[N, T]` train and eval rows (`input_ids`, `labels`,
  `attention_mask`, int64 as `PackedData` holds them), keyed by the docs entries plus
  `max_seq_len`, `pack` and the held-out split's seed and fraction. They are opened as
  copy-on-write memory maps, so rows are paged in from disk as batches read them.

A later run, or a `--resume`, of the same data and tokenizer loads the rows in
milliseconds instead of tokenising again; a different `max_seq_len` repacks from the
docs entry without tokenising. The rows are identical to `pack(tokenize(read_samples()))`
(tests check it), including the held-out documents (the same seeded permutation as
`build.split_documents`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from greentune.data.hf_datasets import DatasetSpec, content_fingerprint
from greentune.data.packing import IGNORE_INDEX, PackedData
from greentune.data.sources import DataSource, iter_samples, source_label
from greentune.data.templates import tokenize
from greentune.errors import UserError
from greentune.fsutil import fsync_dir, temp_sibling

log = logging.getLogger(__name__)

# Bump when tokenising, templating or packing changes what the same inputs produce.
FORMAT_VERSION = 1
DOCS_PER_BATCH = 2048
TOKENS_PER_CHUNK = 1 << 22  # packing works through the documents this many tokens at a time


_private_root: Path | None = None


def cache_root() -> Path:
    """`$GREENTUNE_CACHE/tokens` (default ~/.cache/greentune/tokens). The cache is optional
    bookkeeping: when that folder cannot be made or written (a read-only $HOME, a variable
    pointing below a file), one warning, and this process tokenises into a private temporary
    folder removed at exit, so the run goes on."""
    global _private_root
    if _private_root is not None:
        return _private_root
    root = Path(os.environ.get("GREENTUNE_CACHE") or "~/.cache/greentune").expanduser() / "tokens"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
        reason = "not writable"
    except OSError as err:
        reason = err.strerror or str(err)
    _private_root = Path(tempfile.mkdtemp(prefix="greentune-tokens-"))
    atexit.register(shutil.rmtree, _private_root, True)
    log.warning(
        "token cache %s unusable (%s): tokenising into %s for this process only", root, reason, _private_root
    )
    return _private_root


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_digest(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's serialised form plus its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else repr(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(
        json.dumps(
            [
                getattr(tokenizer, "chat_template", None),
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                type(tokenizer).__name__,
            ],
            default=str,
        ).encode()
    )
    return h.hexdigest()


def source_digest(source: DataSource) -> str:
    """The content of a data source: its files' bytes, or the dataset's fingerprint."""
    if isinstance(source, DatasetSpec):
        return "dataset:" + content_fingerprint(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def docs_key(source: DataSource, tokenizer_hash: str) -> str:
    return _digest({"format": FORMAT_VERSION, "tokenizer": tokenizer_hash, "source": source_digest(source)})


# ---------------------------------------------------------------- tokenised documents


@dataclass(frozen=True)
class DocStore:
    """One source's tokenised documents, memory-mapped (see the module docstring)."""

    ids: np.ndarray  # uint32 [total tokens]
    mask: np.ndarray  # uint8  [total tokens]
    offsets: np.ndarray  # int64  [documents + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def open(cls, folder: Path) -> DocStore:
        offsets = np.fromfile(folder / "offsets.i64", dtype=np.int64)
        n = int(offsets[-1])
        return cls(
            _memmap(folder / "ids.u32", np.uint32, (n,)), _memmap(folder / "mask.u8", np.uint8, (n,)), offsets
        )


def _memmap(path: Path, dtype, shape: tuple) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=shape)


def tokenised_docs(source: DataSource, tokenizer, key: str, progress: bool = True) -> DocStore:
    """The source's documents from the cache entry `key`, tokenising (streaming) into it when absent."""
    folder = cache_root() / f"docs-{key}"
    if (folder / "offsets.i64").is_file():
        try:
            store = DocStore.open(folder)
            log.info("tokenised %s: reusing %s", source_label(source), folder)
            return store
        except (OSError, ValueError, IndexError) as err:
            log.warning("token cache entry %s is unreadable (%s); tokenising again", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    with _new_entry(folder) as tmp:
        _write_docs(source, tokenizer, tmp, progress)
    log.info("tokenised %s into %s", source_label(source), folder)
    return DocStore.open(folder)


def _write_docs(source: DataSource, tokenizer, folder: Path, progress: bool) -> None:
    from tqdm import tqdm

    offsets = [0]
    total = 0
    bar = tqdm(
        desc=f"tokenising {source_label(source)}",
        unit=" docs",
        disable=None if progress else True,
        leave=False,
    )
    with open(folder / "ids.u32", "wb") as ids_f, open(folder / "mask.u8", "wb") as mask_f:
        for batch in _batches(iter_samples(source), DOCS_PER_BATCH):
            for doc in tokenize(batch, tokenizer):
                ids_f.write(np.asarray(doc.ids, dtype=np.uint32).tobytes())
                mask_f.write(np.asarray(doc.mask, dtype=np.uint8).tobytes())
                total += len(doc.ids)
                offsets.append(total)
            bar.update(len(batch))
    bar.close()
    np.asarray(offsets, dtype=np.int64).tofile(folder / "offsets.i64")


@contextmanager
def _new_entry(folder: Path):
    """A temporary sibling folder that becomes `folder` on success (files fsynced first). If
    another process published `folder` meanwhile, its entry is kept and this one dropped."""
    tmp = temp_sibling(folder)
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _batches(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- packed rows


def held_out_mask(n: int, seed: int, eval_fraction: float) -> np.ndarray:
    """Which documents `build.split_documents` holds out (the same seeded permutation), as a bool mask."""
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    held = np.zeros(n, dtype=bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].numpy()] = True
    return held


def _row_chunks(store: DocStore, docs: np.ndarray, T: int, pack: bool, pad_id: int, stats: dict):
    """`(ids, is_target, real)` blocks of whole rows, `[k, T]` each, documents `docs` in order."""
    if pack:
        carry_ids = np.zeros(0, dtype=np.int64)
        carry_tgt = np.zeros(0, dtype=bool)
        for chunk in _doc_chunks(store, docs):
            ids = np.concatenate([carry_ids] + [store.ids[a:b].astype(np.int64) for a, b in chunk])
            tgt = np.concatenate([carry_tgt] + [store.mask[a:b].astype(bool) for a, b in chunk])
            k = len(ids) // T
            yield ids[: k * T].reshape(k, T), tgt[: k * T].reshape(k, T), np.ones((k, T), dtype=np.int64)
            carry_ids, carry_tgt = ids[k * T :], tgt[k * T :]
        if len(carry_ids):
            r = len(carry_ids)
            ids, tgt, real = (
                np.full((1, T), pad_id, np.int64),
                np.zeros((1, T), bool),
                np.zeros((1, T), np.int64),
            )
            ids[0, :r], tgt[0, :r], real[0, :r] = carry_ids, carry_tgt, 1
            yield ids, tgt, real
        return
    for chunk in _doc_chunks(store, docs, max_docs=max(1, TOKENS_PER_CHUNK // T)):  # one row per document
        k = len(chunk)
        ids, tgt, real = np.full((k, T), pad_id, np.int64), np.zeros((k, T), bool), np.zeros((k, T), np.int64)
        for r, (a, b) in enumerate(chunk):
            n = min(b - a, T)
            stats["truncated"] += (b - a) > T
            ids[r, :n], tgt[r, :n], real[r, :n] = store.ids[a : a + n], store.mask[a : a + n], 1
        yield ids, tgt, real


def _doc_chunks(
    store: DocStore, docs: np.ndarray, max_docs: int | None = None
) -> Iterator[list[tuple[int, int]]]:
    """The `(start, end)` token spans of `docs`, in chunks of about TOKENS_PER_CHUNK tokens
    (and at most `max_docs` documents), so packing holds one chunk in memory at a time."""
    chunk, size = [], 0
    for d in docs:
        a, b = int(store.offsets[d]), int(store.offsets[d + 1])
        chunk.append((a, b))
        size += b - a
        if size >= TOKENS_PER_CHUNK or len(chunk) == max_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_rows(
    store: DocStore, docs: np.ndarray, T: int, pack: bool, pad_id: int, folder: Path, split: str, where: str
) -> int:
    """Pack `docs` of `store` into `folder/<split>.*.i64`; returns the number of rows kept."""
    stats = {"truncated": 0}
    total = dropped = 0
    names = ("input_ids", "labels", "attention_mask")
    files = {n: open(folder / f"{split}.{n}.i64", "wb") for n in names}
    try:
        for ids, tgt, real in _row_chunks(store, docs, T, pack, pad_id, stats):
            tgt[:, 0] = False
            keep = tgt.any(axis=1)
            total += len(keep)
            dropped += int((~keep).sum())
            ids, tgt, real = ids[keep], tgt[keep], real[keep]
            labels = np.where(tgt, ids, IGNORE_INDEX)
            for n, arr in zip(names, (ids, labels, real)):
                files[n].write(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    finally:
        for f in files.values():
            f.close()
    if stats["truncated"]:
        log.warning(
            "%d of %d samples are longer than max_seq_len=%d and were truncated",
            stats["truncated"],
            len(docs),
            T,
        )
    if dropped:
        log.warning("dropped %d of %d rows that have no loss tokens", dropped, total)
    if total - dropped == 0:
        raise UserError(
            f"{where}: no loss tokens fit in max_seq_len={T} (are the completions beyond the first "
            f"{T} tokens?)"
        )
    return total - dropped


def _open_rows(folder: Path, split: str, n: int, T: int) -> PackedData:
    t = {
        name: torch.from_numpy(_memmap(folder / f"{split}.{name}.i64", np.int64, (n, T)))
        for name in ("input_ids", "labels", "attention_mask")
    }
    return PackedData(**t)


def cached_datasets(
    train: DataSource,
    eval_: DataSource | None,
    tokenizer,
    max_seq_len: int,
    pack: bool,
    seed: int,
    eval_fraction: float,
    progress: bool = True,
) -> tuple[PackedData, PackedData]:
    """`build_datasets` through the cache: (train, eval) rows, memory-mapped."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tok = tokenizer_digest(tokenizer)
    train_key = docs_key(train, tok)
    eval_key = docs_key(eval_, tok) if eval_ is not None else None
    train_docs = tokenised_docs(train, tokenizer, train_key, progress)
    eval_docs = tokenised_docs(eval_, tokenizer, eval_key, progress) if eval_key else None
    train_label = source_label(train)
    if eval_docs is None and len(train_docs) < 2:
        raise UserError(
            f"{train_label}: only one document, so none can be held out for evaluation; "
            "add more documents or set data.eval"
        )
    key = _digest(
        {
            "train": train_key,
            "eval": eval_key,
            "max_seq_len": max_seq_len,
            "pack": pack,
            "pad_id": pad_id,
            "split": None if eval_docs else [seed, eval_fraction],
        }
    )
    folder = cache_root() / f"rows-{key}"
    if eval_docs is None:
        held = held_out_mask(len(train_docs), seed, eval_fraction)
        log.info(
            "held out %d of %d documents of %s for evaluation", int(held.sum()), len(train_docs), train_label
        )
        plan = [
            ("train", train_docs, np.flatnonzero(~held), train_label),
            ("eval", train_docs, np.flatnonzero(held), train_label),
        ]
    else:
        plan = [
            ("train", train_docs, np.arange(len(train_docs)), train_label),
            ("eval", eval_docs, np.arange(len(eval_docs)), source_label(eval_)),
        ]
    if (folder / "rows.json").is_file():
        try:
            return _open_split_rows(folder, max_seq_len)
        except (OSError, ValueError, KeyError) as err:
            log.warning("token cache entry %s is unreadable (%s); packing again", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    with _new_entry(folder) as tmp:
        rows = {
            split: _write_rows(store, docs, max_seq_len, pack, pad_id, tmp, split, where)
            for split, store, docs, where in plan
        }
        (tmp / "rows.json").write_text(json.dumps({"rows": rows, "seq_len": max_seq_len}))
    return _open_split_rows(folder, max_seq_len)


def _open_split_rows(folder: Path, T: int) -> tuple[PackedData, PackedData]:
    rows = json.loads((folder / "rows.json").read_text())["rows"]
    train, held = (_open_rows(folder, split, rows[split], T) for split in ("train", "eval"))
    log.info("training rows from %s", folder)
    return train, held
