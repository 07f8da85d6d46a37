"""Ollama TEMPLATE and stop tokens for gpt-oss's chat format, harmony.

Harmony messages are ``<|start|>{role}<|message|>{content}<|end|>``; the assistant answers in
channels (``<|start|>assistant<|channel|>analysis<|message|>…<|end|>`` then
``<|start|>assistant<|channel|>final<|message|>…<|return|>``) and ends its turn with
``<|return|>``, or ``<|call|>`` for a tool call — the two stop tokens (`<|end|>` only closes
one channel, so it is not a stop). gpt-oss's Jinja template also writes a system header (date,
reasoning effort) and moves the user's system prompt into a developer message; it cannot be
rendered per message (`modelfile._pieces` refuses it), so this template is written instead:
the user's system prompt as the developer's instructions, past assistant turns in the final
channel, and a generation prompt of ``<|start|>assistant`` that leaves the channel to the model.
"""

from __future__ import annotations

STOPS = ("<|return|>", "<|call|>")
_MARKERS = ("<|start|>", "<|message|>", "<|channel|>")

TEMPLATE = (
    "{{- range $i, $_ := .Messages }}"
    '{{ if eq .Role "system" }}<|start|>developer<|message|># Instructions\n\n{{ .Content }}<|end|>'
    '{{ else if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>'
    '{{ else if eq .Role "assistant" }}<|start|>assistant<|channel|>final<|message|>{{ .Content }}<|end|>'
    "{{ end }}"
    '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|start|>assistant{{ end }}'
    "{{ end }}"
)


def is_harmony(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes harmony messages (gpt-oss)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and all(m in template for m in _MARKERS)
