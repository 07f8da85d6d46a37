"""Turn samples into token ids plus a loss mask (True = this token is a training target).

Every sample becomes a list of `Segment`s, each tokenised on its own and concatenated, so
the boundary between "context" and "target" falls exactly between two tokens (tokenising
the joined string could merge a prompt's last characters with a completion's first):

- text:               [text → loss]
- prompt/completion:  [prompt → no loss] [completion → loss]
- messages, when the tokenizer has a chat template: the template is rendered incrementally.
  For the assistant message i, `render(messages[:i], add_generation_prompt=True)` is the
  context and the rest of `render(messages[:i+1])` (content plus the template's end-of-turn
  markup) is the target. Each render must be a prefix of the next and of the whole
  conversation; a template that is not prefix-stable (e.g. one that rewrites earlier turns)
  raises `UserError`, because its assistant tokens cannot be located exactly.
- messages, when it has none: the plain template below, headers out of the loss, each
  assistant reply followed by EOS in the loss so the model learns to stop:

      ### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}</s>\\n\\n...

  (the header is the role with its first letter capitalised). At inference, prompt with the
  turns so far followed by "### Assistant:\\n".

Each document starts with BOS (not a target) when the tokenizer has one and ends with EOS
(a target when the document's last segment is) unless it already ends with it.

User text (text, prompt, completion, plain-template content) is tokenised with special
tokens split, so a literal "</s>" in a file is text, not an end of document. Chat-template
output is tokenised with special tokens recognised, since its markup is made of them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from greentune.data.sources import ChatSample, PromptSample, Sample, TextSample
from greentune.errors import UserError


class Tokenized(NamedTuple):
    """One document: token ids and, per token, whether it is a training target."""

    ids: list[int]
    mask: list[bool]


@dataclass(frozen=True)
class Segment:
    """A piece of a document: text (or ready ids) and whether it is in the loss.

    `markup=True` means the text comes from a chat template: special tokens in it are parsed.
    """

    piece: str | tuple[int, ...]
    loss: bool
    markup: bool = False


def tokenize(samples: list[Sample], tokenizer) -> list[Tokenized]:
    """Tokenise `samples` with their loss masks; text is encoded in two batched calls (on every core)."""
    docs = [segments(s, tokenizer) for s in samples]
    encoded: dict[bool, dict[str, list[int]]] = {}
    for markup in (False, True):
        texts = list(
            dict.fromkeys(
                seg.piece
                for doc in docs
                for seg in doc
                if isinstance(seg.piece, str) and seg.markup == markup
            )
        )
        if texts:
            with parallel_tokenizers():
                ids = tokenizer(
                    texts, add_special_tokens=False, split_special_tokens=not markup, verbose=False
                )["input_ids"]
            encoded[markup] = dict(zip(texts, ids))
    out = []
    for doc in docs:
        ids: list[int] = []
        mask: list[bool] = []
        for seg in doc:
            piece = encoded[seg.markup][seg.piece] if isinstance(seg.piece, str) else list(seg.piece)
            ids += piece
            mask += [seg.loss] * len(piece)
        out.append(_wrap(ids, mask, tokenizer))
    return out


@contextmanager
def parallel_tokenizers():
    """Let the fast tokenizer's batch encode use every core (the CLI turns it off elsewhere, for forks)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def segments(sample: Sample, tokenizer) -> list[Segment]:
    """The segments of one sample, by its type."""
    return _SEGMENTERS[type(sample)](sample, tokenizer)


def _wrap(ids: list[int], mask: list[bool], tokenizer) -> Tokenized:
    """BOS in front (not a target), EOS behind (a target if the last token is), once each."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [False] + mask
    if eos is not None and ids and ids[-1] != eos:
        ids, mask = ids + [eos], mask + [mask[-1]]
    return Tokenized(ids, mask)


def _text_segments(sample: TextSample, tokenizer) -> list[Segment]:
    return [Segment(sample.text, loss=True)]


def _prompt_segments(sample: PromptSample, tokenizer) -> list[Segment]:
    prompt = [Segment(sample.prompt, loss=False)] if sample.prompt else []
    return prompt + [Segment(sample.completion, loss=True)]


def _chat_segments(sample: ChatSample, tokenizer) -> list[Segment]:
    if getattr(tokenizer, "chat_template", None):
        return chat_template_segments(sample, tokenizer)
    return plain_template_segments(sample, tokenizer)


_SEGMENTERS = {TextSample: _text_segments, PromptSample: _prompt_segments, ChatSample: _chat_segments}


def plain_template_segments(sample: ChatSample, tokenizer) -> list[Segment]:
    """The documented plain template (see the module docstring) for tokenizers without one."""
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    out: list[Segment] = []
    for i, (role, content) in enumerate(sample.messages):
        sep = "\n\n" if i else ""
        out.append(Segment(f"{sep}### {role[:1].upper()}{role[1:]}:\n", loss=False))
        if role == "assistant":
            out += (
                [Segment(content, loss=True), Segment(eos, loss=True)]
                if content
                else [Segment(eos, loss=True)]
            )
        elif content:
            out.append(Segment(content, loss=False))
    return [s for s in out if s.piece]


def chat_template_segments(sample: ChatSample, tokenizer) -> list[Segment]:
    """Render with the tokenizer's chat template; loss on exactly the assistant turns."""
    messages = [{"role": r, "content": c} for r, c in sample.messages]
    full = _render(tokenizer, messages, False, sample.origin)
    out: list[Segment] = []
    done = 0  # characters of `full` already assigned
    for i, (role, _) in enumerate(sample.messages):
        if role != "assistant":
            continue
        context = _render(tokenizer, messages[:i], True, sample.origin)
        turn = _render(tokenizer, messages[: i + 1], False, sample.origin)
        if not (turn.startswith(context) and full.startswith(turn) and len(context) >= done):
            raise UserError(
                f"{sample.origin}: the tokenizer's chat template is not prefix-stable (rendering "
                f"messages[:{i}] "
                "is not a prefix of the whole conversation), so assistant tokens cannot be masked exactly; "
                "use prompt/completion records, or remove chat_template from the tokenizer to use the plain "
                "template"
            )
        out += [
            Segment(full[done : len(context)], loss=False, markup=True),
            Segment(full[len(context) : len(turn)], loss=True, markup=True),
        ]
        done = len(turn)
    out.append(Segment(full[done:], loss=False, markup=True))
    return [s for s in out if s.piece]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, origin: str) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise UserError(f"{origin}: the tokenizer's chat template fails on this conversation: {err}") from err
    if not isinstance(text, str):
        raise UserError(f"{origin}: the tokenizer's chat template did not render to text")
    return text
