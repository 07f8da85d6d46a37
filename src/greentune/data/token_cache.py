"""A shared cache of tokenised, packed training data, so a corpus is tokenised once.

`build_datasets` looks here first. An entry is a folder under
`$GREENTUNE_CACHE/tokens/<key>/` holding `train.safetensors` and `eval.safetensors`
(input ids and labels as int32, the attention mask as uint8: PackedData's three tensors in
a third of the bytes), written through `atomic_dir`, so a reader never sees half an entry.

The key is a SHA-256 of everything the rows depend on: the tokenizer (its full serialised
vocabulary, merges, normaliser and special tokens, and its chat template), the data
*content* (the bytes of every file read, or `datasets`' fingerprint of a dataset split),
the template code's version, `max_seq_len`, `pack`, and the seed and fraction of the
held-out split. Change any of them and the key changes; nothing is ever reused stale.
A `--resume`, and any later run of the same data and tokenizer, loads the rows instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from greentune.data.hf_datasets import DatasetSpec, content_fingerprint
from greentune.data.packing import PackedData
from greentune.fsutil import atomic_dir

log = logging.getLogger(__name__)

# Bump when tokenising, templating or packing changes what the same inputs produce.
FORMAT_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("GREENTUNE_CACHE") or "~/.cache/greentune").expanduser() / "tokens"


def tokenizer_digest(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's serialised form plus its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, type(tokenizer).__name__], default=str).encode())
    return h.hexdigest()


def source_digest(source) -> str:
    """The content of a data source: its files' bytes, or the dataset's fingerprint."""
    if isinstance(source, DatasetSpec):
        return "dataset:" + content_fingerprint(source)
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def cache_key(train, eval_, tokenizer, max_seq_len: int, pack: bool, seed: int, eval_fraction: float) -> str:
    parts = {"format": FORMAT_VERSION, "tokenizer": tokenizer_digest(tokenizer), "train": source_digest(train),
             "eval": source_digest(eval_) if eval_ is not None else None, "max_seq_len": max_seq_len,
             "pack": pack, "seed": seed if eval_ is None else None,
             "eval_fraction": eval_fraction if eval_ is None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str) -> tuple[PackedData, PackedData] | None:
    """The cached (train, eval) rows for `key`, or None when there is no complete entry."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = cache_root() / key
    if not (folder / "eval.safetensors").is_file():
        return None
    try:
        out = []
        for split in ("train", "eval"):
            t = load_file(str(folder / f"{split}.safetensors"))
            out.append(PackedData(input_ids=t["input_ids"].long(), labels=t["labels"].long(),
                                  attention_mask=t["attention_mask"].long()))
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, AssertionError) as err:
        log.warning("token cache entry %s is unreadable (%s); tokenising again", folder, err)
        return None
    log.info("loaded tokenised data from %s", folder)
    return out[0], out[1]


def store(key: str, train: PackedData, eval_: PackedData) -> None:
    """Save both splits as one cache entry (atomically; a failure only costs the cache)."""
    from safetensors.torch import save_file

    folder = cache_root() / key
    try:
        with atomic_dir(folder) as tmp:
            for split, d in (("train", train), ("eval", eval_)):
                save_file({"input_ids": d.input_ids.to(torch.int32), "labels": d.labels.to(torch.int32),
                           "attention_mask": d.attention_mask.to(torch.uint8)}, str(tmp / f"{split}.safetensors"))
    except OSError as err:
        log.warning("could not write the token cache %s (%s); continuing without it", folder, err)
        return
    log.info("tokenised data cached in %s", folder)
