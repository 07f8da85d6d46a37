"""Read training documents from disk: `.jsonl`, one `.txt` file, or a directory of `.txt`.

Each `.jsonl` line is one JSON object in one of three shapes (shapes may mix within a file;
other keys such as "id" are ignored):

    {"text": "..."}                                   all tokens are trained on
    {"prompt": "...", "completion": "..."}            loss only on the completion
    {"messages": [{"role": "...", "content": "..."}, ...]}   loss only on assistant turns

A `.txt` file is one document, whole: splitting on blank lines would cut code apart. A
directory is read as every `*.txt` under it (recursively, hidden paths skipped), in sorted
order, one document per file; empty files there are skipped with a warning.

Every problem the user can fix raises `UserError` with one line naming the file and, for
`.jsonl`, the line number. Each sample remembers its `origin` ("path:line") so later stages
can point at it too.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError

log = logging.getLogger(__name__)

SHAPES = '{"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}'


@dataclass(frozen=True)
class TextSample:
    """Plain text: every token is in the loss."""
    text: str
    origin: str


@dataclass(frozen=True)
class PromptSample:
    """A prompt and its completion: only completion tokens are in the loss."""
    prompt: str
    completion: str
    origin: str


@dataclass(frozen=True)
class ChatSample:
    """A conversation, as (role, content) pairs: only assistant turns are in the loss."""
    messages: tuple[tuple[str, str], ...]
    origin: str


Sample = TextSample | PromptSample | ChatSample


def read_samples(path: str | Path) -> list[Sample]:
    """All samples at `path` (a `.jsonl` file, a `.txt` file or a directory of `.txt`), in order."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        samples = _read_txt_dir(path)
    elif path.suffix == ".jsonl":
        samples = _read_jsonl(path)
    elif path.suffix == ".txt":
        samples = [_read_txt(path, skip_empty=False)]
    else:
        raise UserError(f"{path}: unsupported data file; use .jsonl, .txt or a directory of .txt files")
    if not samples:
        raise UserError(f"{path}: no training samples")
    return samples


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


def _read_txt_dir(root: Path) -> list[Sample]:
    files = sorted(p for p in root.rglob("*.txt")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UserError(f"{root}: no .txt files in this directory")
    samples = [_read_txt(p, skip_empty=True) for p in files]
    return [s for s in samples if s is not None]


def _read_jsonl(path: Path) -> list[Sample]:
    samples: list[Sample] = []
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
            samples.append(parse_record(obj, where))
    if not samples:
        raise UserError(f"{path}: empty file, no training samples")
    return samples


def parse_record(obj: object, where: str) -> Sample:
    """One JSON value → a sample, or `UserError` naming `where` and the accepted shapes."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_json_type(obj)}; accepted shapes: {SHAPES}")
    shapes = [name for name, keys in (("messages", ("messages",)), ("prompt/completion", ("prompt", "completion")),
                                      ("text", ("text",))) if any(k in obj for k in keys)]
    if not shapes:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise UserError(f"{where}: no known keys (found: {keys}); accepted shapes: {SHAPES}")
    if len(shapes) > 1:
        raise UserError(f"{where}: ambiguous record, has keys of several shapes ({' and '.join(shapes)}); "
                        f"use exactly one of {SHAPES}")
    if shapes[0] == "text":
        return TextSample(text=_nonempty_str(obj, "text", where), origin=where)
    if shapes[0] == "prompt/completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise UserError(f'{where}: "{key}" is missing; a prompt/completion record needs both keys')
        prompt = _str(obj["prompt"], '"prompt"', where)
        return PromptSample(prompt=prompt, completion=_nonempty_str(obj, "completion", where), origin=where)
    return ChatSample(messages=_messages(obj["messages"], where), origin=where)


def _messages(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, '
                        f"got {_json_type(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f'{where}: messages[{i}] must be an object with "role" and "content"')
        role = _str(m["role"], f'messages[{i}]["role"]', where)
        if not role:
            raise UserError(f'{where}: messages[{i}]["role"] is empty')
        out.append((role, _str(m["content"], f'messages[{i}]["content"]', where)))
    if not any(role == "assistant" for role, _ in out):
        raise UserError(f'{where}: no "assistant" message, so nothing to learn from this conversation')
    return tuple(out)


def _str(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {name} must be a string, got {_json_type(value)}")
    return value


def _nonempty_str(obj: dict, key: str, where: str) -> str:
    value = _str(obj[key], f'"{key}"', where)
    if not value:
        raise UserError(f'{where}: "{key}" is empty')
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
