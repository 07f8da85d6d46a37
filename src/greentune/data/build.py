"""From the recipe's `data:` section to packed train and eval sets.

The eval set is `eval_path` when given; otherwise a held-out share of the training
*documents*, chosen before packing so no document is split between train and eval. The
choice is a seeded permutation, so the same seed always holds out the same documents.
"""

from __future__ import annotations

import logging

import torch

from greentune.data.packing import PackedData
from greentune.data.packing import pack as pack_rows
from greentune.data.sources import DataSource, Sample, read_samples, source_label
from greentune.data.templates import tokenize
from greentune.errors import UserError

log = logging.getLogger(__name__)


def split_documents(
    samples: list[Sample], seed: int, eval_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): `max(1, round(n * eval_fraction))` documents held out, file order kept in both."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n = len(samples)
    assert n >= 2, n
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [
        s for i, s in enumerate(samples) if i in held
    ]


def build_datasets(
    train_path: DataSource,
    eval_path: DataSource | None,
    tokenizer,
    max_seq_len: int,
    pack: bool = True,
    seed: int = 0,
    eval_fraction: float = 0.05,
    cache: bool = True,
    progress: bool = True,
) -> tuple[PackedData, PackedData]:
    """Read, tokenise (with loss masks) and pack the train and eval data.

    With `cache` (what `greentune train` uses) through the shared token cache: tokenised
    once, streamed to memory-mapped files and reused by later runs (see `token_cache`);
    without, in memory. Both give the same rows."""
    if cache:
        from greentune.data.token_cache import cached_datasets

        return cached_datasets(
            train_path, eval_path, tokenizer, max_seq_len, pack, seed, eval_fraction, progress
        )
    return _build(train_path, eval_path, tokenizer, max_seq_len, pack, seed, eval_fraction)


def _build(
    train_path: DataSource,
    eval_path: DataSource | None,
    tokenizer,
    max_seq_len: int,
    pack: bool,
    seed: int,
    eval_fraction: float,
) -> tuple[PackedData, PackedData]:
    train_docs = read_samples(train_path)
    if eval_path is not None:
        eval_docs = read_samples(eval_path)
    elif len(train_docs) < 2:
        raise UserError(
            f"{source_label(train_path)}: only one document, so none can be held out for evaluation; "
            "add more documents or set data.eval"
        )
    else:
        train_docs, eval_docs = split_documents(train_docs, seed, eval_fraction)
        log.info(
            "held out %d of %d documents of %s for evaluation",
            len(eval_docs),
            len(train_docs) + len(eval_docs),
            source_label(train_path),
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return (
        _pack(train_docs, source_label(train_path), tokenizer, max_seq_len, pack, pad_id),
        _pack(eval_docs, source_label(eval_path or train_path), tokenizer, max_seq_len, pack, pad_id),
    )


def _pack(docs: list[Sample], path: str, tokenizer, max_seq_len: int, pack: bool, pad_id: int) -> PackedData:
    try:
        return pack_rows(tokenize(docs, tokenizer), max_seq_len, pack=pack, pad_id=pad_id)
    except UserError as err:
        if str(err).startswith(f"{path}"):
            raise
        raise UserError(f"{path}: {err}") from None
