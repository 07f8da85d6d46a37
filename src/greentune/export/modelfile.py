"""Ollama `Modelfile` beside a GGUF, so `ollama create NAME -f model-q4_k_m.Modelfile` works as is.

One Modelfile per GGUF, named after it (`model-q4_k_m.gguf` → `model-q4_k_m.Modelfile`), so
several quantisations can share an export folder:

    FROM ./model-q4_k_m.gguf
    TEMPLATE \"\"\"...Go template...\"\"\"
    PARAMETER stop "<|end|>"

The Go `TEMPLATE` is derived from the tokenizer's Jinja chat template by *rendering* it,
not by translating Jinja: for each role (system, user, assistant) greentune renders a
one-message conversation with a marker as content, which gives the text before and after
the content for that role, and the generation prompt is what `add_generation_prompt=True`
adds. The result is checked: rendering a three-message conversation with the Go template's
pieces must equal the Jinja rendering exactly; otherwise (templates with logic across
messages, default system prompts, BOS only at the start, ...) the documented plain
template is written instead and a warning logged:

    {{ if .System }}{{ .System }}

    {{ end }}{{ .Prompt }}

For greentune's tiny tokenizer (`<|role|>\ncontent<|end|>\n` per message, then
`<|assistant|>\n`) the TEMPLATE is (one string; line breaks are the template's own)::

    {{- range $i, $_ := .Messages }}{{ if eq .Role "system" }}<|system|>
    {{ .Content }}<|end|>
    {{ else if eq .Role "user" }}<|user|>
    {{ .Content }}<|end|>
    {{ else if eq .Role "assistant" }}<|assistant|>
    {{ .Content }}<|end|>
    {{ end }}{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|assistant|>
    {{ end }}{{ end }}

No `{{-` follows literal text, since Go's left trim would also eat the newline a piece
ends with.

`PARAMETER stop` lists the EOS token and the special token the template closes a message
with (`gguf_vocab.end_tokens`). gpt-oss's harmony format has its own (`modelfile_harmony`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from greentune.export.gguf_vocab import end_tokens
from greentune.fsutil import atomic_write_text

log = logging.getLogger(__name__)

PLAIN_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
ROLES = ("system", "user", "assistant")
_MARK = "\u2063GT\u2063"


def _render(tokenizer, messages, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _pieces(tokenizer) -> tuple[dict[str, tuple[str, str]], str] | None:
    """Per role (text before content, text after content) and the generation prompt, or None."""
    pieces = {}
    try:
        for role in ROLES:
            text = _render(tokenizer, [{"role": role, "content": _MARK}], False)
            if text.count(_MARK) != 1:
                return None
            pieces[role] = tuple(text.split(_MARK))
        convo = [{"role": r, "content": f"{r} says hi"} for r in ROLES[:2]]
        gen = _render(tokenizer, convo, True)
        plain = _render(tokenizer, convo, False)
        if not gen.startswith(plain):
            return None
        gen_prompt = gen[len(plain) :]
        # the check: concatenating per-message pieces reproduces Jinja exactly
        convo3 = [{"role": r, "content": f"{r} says hi"} for r in ROLES]
        want = _render(tokenizer, convo3, False)
        got = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in convo3)
        if got != want or plain + gen_prompt != gen:
            return None
    except Exception as e:  # noqa: BLE001 — any template failure means "use the plain one"
        log.debug("chat template not renderable per message: %s", e)
        return None
    return pieces, gen_prompt


def go_template(tokenizer) -> str:
    """An Ollama (Go) TEMPLATE equivalent to the tokenizer's chat template, or PLAIN_TEMPLATE."""
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_TEMPLATE
    found = _pieces(tokenizer)
    if found is None or any("{{" in s for p in found[0].values() for s in p) or "{{" in found[1]:
        log.warning("chat template is not a per-message template; writing Ollama's plain template")
        return PLAIN_TEMPLATE
    pieces, gen_prompt = found
    # No "{{-" after literal text: Go's left trim would eat the newline a piece ends with.
    out = "{{- range $i, $_ := .Messages }}"
    for k, role in enumerate(ROLES):
        kw = "if" if k == 0 else "else if"
        before, after = pieces[role]
        out += f'{{{{ {kw} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
    out += "{{ end }}"
    out += (
        f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}}}{gen_prompt}{{{{ end }}}}'
    )
    return out + "{{ end }}"


def modelfile_text(gguf_path: str | Path, tokenizer) -> str:
    """The Modelfile for `gguf_path` (referenced relative to the Modelfile's folder)."""
    from greentune.export import modelfile_harmony

    name = Path(gguf_path).name
    harmony = modelfile_harmony.is_harmony(tokenizer)  # gpt-oss: its own template and stops
    template = modelfile_harmony.TEMPLATE if harmony else go_template(tokenizer)
    parts = [f"FROM ./{name}", f'TEMPLATE """{template}"""']
    for s in modelfile_harmony.STOPS if harmony else end_tokens(tokenizer):
        parts.append(f'PARAMETER stop "{_quote(s)}"')
    return "\n".join(parts) + "\n"


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def write_modelfile(gguf_path: str | Path, tokenizer, out_path: str | Path | None = None) -> Path:
    """Write an Ollama Modelfile beside `gguf_path` (default `<stem>.Modelfile`); return its path.

    `tokenizer` is an HF tokenizer or a model directory to load it from.
    """
    gguf_path = Path(gguf_path)
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    out = Path(out_path) if out_path else gguf_path.with_suffix(".Modelfile")
    atomic_write_text(out, modelfile_text(gguf_path, tokenizer))
    return out
