"""The three kinds of training document, each remembering its `origin` ("path:line" or a dataset row)."""

from __future__ import annotations

from dataclasses import dataclass


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
