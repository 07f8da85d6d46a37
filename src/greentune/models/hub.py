"""Hugging Face Hub model ids (`ORG/NAME` or `ORG/NAME@REVISION`) → a local snapshot folder.

Resolution is huggingface_hub's own (`snapshot_download`), so its cache layout, `HF_HOME` /
`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` and login token all apply unchanged:

1. The local cache first (`local_files_only=True`): a snapshot already holding what is
   needed is used without touching the network.
2. Otherwise, when online, a download of only what greentune reads: `config.json`, the
   safetensors index, tokenizer and generation files, then the safetensors shards the index
   names (or the top-level `*.safetensors` when there is no index, so a repo's duplicate
   `consolidated.safetensors` or subfolder copies are not fetched). Pickled weights never are.
   `config_only=True` (the planner) stops after `config.json`.

The snapshot folder's name is the commit, which the caller records so a run is
reproducible; passing that commit back as `revision` pins the same files. Every failure a
user can fix (gated, missing, not cached offline, no connection) is one `UserError` line
saying what to do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")

CONFIG_FILES = ["config.json"]
META_FILES = CONFIG_FILES + [
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference lives on disk; `repo_id`/`commit` are None for a local folder."""

    path: Path
    repo_id: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}" if self.repo_id else str(self.path)


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision or None)` when `ref` reads as a Hub id and is not an existing local path."""
    m = _HUB_ID.match(str(ref))
    if m is None or Path(ref).exists():
        return None
    return m["repo"], m["rev"]


def is_hub_id(ref: str | Path) -> bool:
    return parse_hub_id(str(ref)) is not None


def resolve_model(ref: str | Path, revision: str | None = None, config_only: bool = False) -> ResolvedModel:
    """A local folder as is; a Hub id through the HF cache (see the module docstring).

    `revision` (e.g. a commit recorded by an earlier run) overrides an `@REVISION` in `ref`.
    """
    parsed = parse_hub_id(str(ref))
    if parsed is None:
        return ResolvedModel(Path(ref))
    repo_id, rev = parsed
    rev = revision or rev
    snapshot = _cached(repo_id, rev, config_only)
    if snapshot is None:
        snapshot = _download(repo_id, rev, config_only)
    commit = snapshot.name
    log.info("%s resolved to commit %s (%s)", repo_id, commit, snapshot)
    return ResolvedModel(snapshot, repo_id, commit)


def _cached(repo_id: str, rev: str | None, config_only: bool) -> Path | None:
    """The cached snapshot when it already has every file needed, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(
            snapshot_download(repo_id, revision=rev, local_files_only=True, allow_patterns=META_FILES)
        )
    except LocalEntryNotFoundError:
        return None
    except ValueError as err:  # HFValidationError: not a valid repo id / revision
        raise UserError(f"{repo_id}: not a valid Hugging Face Hub id ({str(err).splitlines()[0]})") from None
    missing = _missing(snapshot, config_only)
    if missing:
        log.info("%s: cached snapshot %s lacks %s", repo_id, snapshot.name, ", ".join(missing[:3]))
        return None
    return snapshot


def _missing(snapshot: Path, config_only: bool) -> list[str]:
    """Files greentune needs that the snapshot folder lacks."""
    if not (snapshot / "config.json").is_file():
        return ["config.json"]
    if config_only:
        return []
    shards = _index_shards(snapshot)
    if shards is None:
        return [] if any(snapshot.glob("*.safetensors")) else ["*.safetensors"]
    return [s for s in shards if not (snapshot / s).is_file()]


def _index_shards(snapshot: Path) -> list[str] | None:
    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise UserError(f"{index}: not a valid safetensors index ({err})") from None


def _download(repo_id: str, rev: str | None, config_only: bool) -> Path:
    """Fetch the needed files (cache-aware, so a partial snapshot only gets what it lacks)."""
    from huggingface_hub import constants, snapshot_download

    with _hub_errors(repo_id, rev, constants):
        snapshot = Path(
            snapshot_download(
                repo_id, revision=rev, allow_patterns=CONFIG_FILES if config_only else META_FILES
            )
        )
        if not config_only:
            shards = _index_shards(snapshot)
            weights = (
                dict(allow_patterns=shards)
                if shards
                else dict(allow_patterns=["*.safetensors"], ignore_patterns=["*/*"])
            )
            snapshot = Path(snapshot_download(repo_id, revision=snapshot.name, **weights))
    missing = _missing(snapshot, config_only)
    if missing and constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{repo_id}@{snapshot.name}: the cached snapshot lacks {missing[0]} and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; run once online or `hf download {repo_id}`"
        )
    if missing:
        raise UserError(
            f"{repo_id}@{snapshot.name}: the repository has no {missing[0]}; greentune loads "
            "safetensors weights only (never pickles): use a repo that publishes them"
        )
    return snapshot


@contextmanager
def _hub_errors(repo_id: str, rev: str | None, constants) -> Iterator[None]:
    """Turn huggingface_hub's failures into one line saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{rev}" if rev else repo_id
    folder = f"download it to a folder (`hf download {repo_id} --local-dir DIR`) and give that folder"
    try:
        yield
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login`), or {folder}"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id}: no such model on the Hugging Face Hub, or it is private (log in with "
            f"`hf auth login`); or {folder}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: the repository has no revision {rev!r}") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                f"forbids downloading; run once online, `hf download {repo_id}`, or {folder}"
            ) from None
        raise UserError(
            f"{where}: not in the Hugging Face cache and the Hub cannot be reached; check the "
            f"connection, or {folder}"
        ) from None
    except HfHubHTTPError as err:
        raise UserError(
            f"{where}: the Hugging Face Hub refused the download ({str(err).splitlines()[0]})"
        ) from None
    except ValueError as err:  # HFValidationError
        raise UserError(f"{where}: not a valid Hugging Face Hub id ({str(err).splitlines()[0]})") from None
    except OSError as err:
        raise UserError(
            f"{where}: the download failed ({err}); check the disk and the connection, or {folder}"
        ) from None
