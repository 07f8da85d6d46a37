"""One record (a JSON line or a dataset row) → a sample, its shape detected per record.

Shapes (records of different shapes may mix; other keys such as "id" are ignored, and a
record with every key of one shape is that shape even if it has some keys of another):

    {"text": "..."}                                            all tokens are trained on
    {"prompt": "...", "completion": "..."}                     loss on the completion
    {"messages": [{"role", "content"}, ...]}                   OpenAI chat: loss on assistant turns;
                                                               roles system, developer, user, assistant, tool
    {"conversations": [{"from", "value"}, ...]}                ShareGPT: human → user, gpt → assistant, system
    {"instruction": "...", "input": "...", "output": "..."}    Alpaca: loss on the output; input optional

A `text` record that is only whitespace is no document: `parse_record` returns None and the
reader counts it. Every other problem is a `UserError` naming `where` (file:line or dataset
row). `columns` renames the user's keys onto these (`{"question": "prompt", "answer": "completion"}`).
"""

from __future__ import annotations

from greentune.data.samples import ChatSample, PromptSample, Sample, TextSample
from greentune.errors import UserError

SHAPES = (
    '{"text"}, {"prompt", "completion"}, {"messages": [{"role", "content"}, ...]}, '
    '{"conversations": [{"from", "value"}, ...]} (ShareGPT) or {"instruction", "input", "output"} (Alpaca)'
)

# shape name → (the keys a complete record of it has, the keys any of which hint at it)
_SHAPE_KEYS = (
    ("messages", ("messages",), ("messages",)),
    ("conversations", ("conversations",), ("conversations",)),
    ("instruction/output", ("instruction", "output"), ("instruction",)),
    ("prompt/completion", ("prompt", "completion"), ("prompt", "completion")),
    ("text", ("text",), ("text",)),
)
KNOWN_KEYS = ("text", "prompt", "completion", "messages", "conversations", "instruction", "input", "output")

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def parse_record(obj: object, where: str, columns: dict[str, str] | None = None) -> Sample | None:
    """One record → a sample; None for a whitespace-only text; `UserError` for anything else wrong."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type(obj)}; accepted shapes: {SHAPES}")
    if columns:
        obj = {columns.get(k, k): v for k, v in obj.items()}
    # A row with all keys of exactly one shape is that shape, whatever else it holds (datasets
    # often carry extra columns, e.g. a "prompt" beside "messages"); failing that, the shape it
    # has some keys of, so the error can name what is missing.
    shapes = [name for name, full, _ in _SHAPE_KEYS if all(k in obj for k in full)]
    if not shapes:
        shapes = [name for name, _, hints in _SHAPE_KEYS if any(k in obj for k in hints)]
    if not shapes:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise UserError(f"{where}: no known keys (found: {keys}); accepted shapes: {SHAPES}")
    if len(shapes) > 1:
        raise UserError(
            f"{where}: ambiguous record, has keys of several shapes ({' and '.join(sorted(shapes))}); "
            f"use exactly one of {SHAPES}"
        )
    return _PARSERS[shapes[0]](obj, where)


def _text(obj: dict, where: str) -> TextSample | None:
    text = _str(obj["text"], '"text"', where)
    return TextSample(text=text, origin=where) if text.strip() else None


def _prompt(obj: dict, where: str) -> PromptSample:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise UserError(f'{where}: "{key}" is missing; a prompt/completion record needs both keys')
    prompt = _str(obj["prompt"], '"prompt"', where)
    return PromptSample(prompt=prompt, completion=_nonempty_str(obj, "completion", where), origin=where)


def _alpaca(obj: dict, where: str) -> PromptSample:
    """Alpaca's own prompt layout: the instruction, then the input when there is one."""
    if "output" not in obj:
        raise UserError(f'{where}: "output" is missing; an Alpaca record needs "instruction" and "output"')
    instruction = _nonempty_str(obj, "instruction", where)
    extra = _str(obj.get("input") or "", '"input"', where)
    prompt = f"{instruction}\n\n{extra}\n\n" if extra.strip() else f"{instruction}\n\n"
    return PromptSample(prompt=prompt, completion=_nonempty_str(obj, "output", where), origin=where)


def _openai(obj: dict, where: str) -> ChatSample:
    value = obj["messages"]
    if not isinstance(value, list) or not value:
        raise UserError(
            f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, '
            f"got {json_type(value)}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f'{where}: messages[{i}] must be an object with "role" and "content"')
        role = _str(m["role"], f'messages[{i}]["role"]', where)
        if not role:
            raise UserError(f'{where}: messages[{i}]["role"] is empty')
        if role not in CHAT_ROLES:
            raise UserError(
                f"{where}: messages[{i}] has unknown role {role!r}; roles are {', '.join(CHAT_ROLES)}"
            )
        out.append((role, _content(m["content"], f'messages[{i}]["content"]', where)))
    return _chat(out, where)


def _sharegpt(obj: dict, where: str) -> ChatSample:
    value = obj["conversations"]
    if not isinstance(value, list) or not value:
        raise UserError(
            f'{where}: "conversations" must be a non-empty list of {{"from", "value"}} objects, '
            f"got {json_type(value)}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise UserError(f'{where}: conversations[{i}] must be an object with "from" and "value"')
        speaker = _str(m["from"], f'conversations[{i}]["from"]', where)
        if speaker not in SHAREGPT_ROLES:
            raise UserError(
                f"{where}: conversations[{i}] has unknown role {speaker!r}; "
                f"ShareGPT roles are {', '.join(SHAREGPT_ROLES)}"
            )
        out.append((SHAREGPT_ROLES[speaker], _str(m["value"], f'conversations[{i}]["value"]', where)))
    return _chat(out, where)


def _chat(messages: list[tuple[str, str]], where: str) -> ChatSample:
    if not any(role == "assistant" for role, _ in messages):
        raise UserError(f'{where}: no "assistant" message, so nothing to learn from this conversation')
    return ChatSample(messages=tuple(messages), origin=where)


def _content(value: object, name: str, where: str) -> str:
    """OpenAI content: a string, null (an assistant turn that only calls tools), or text parts."""
    if value is None:
        return ""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
    ):
        return "".join(_str(p.get("text"), f"{name}[].text", where) for p in value)
    return _str(value, name, where)


_PARSERS = {
    "text": _text,
    "prompt/completion": _prompt,
    "instruction/output": _alpaca,
    "messages": _openai,
    "conversations": _sharegpt,
}


def _str(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {name} must be a string, got {json_type(value)}")
    return value


def _nonempty_str(obj: dict, key: str, where: str) -> str:
    value = _str(obj[key], f'"{key}"', where)
    if not value:
        raise UserError(f'{where}: "{key}" is empty')
    return value


def json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
