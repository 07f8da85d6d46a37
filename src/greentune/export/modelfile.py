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

A template that opens the conversation once with special tokens (DeepSeek-V3's BOS,
GLM-4.5's `[gMASK]<sop>`, Llama-3's BOS on its first message) gets that opening before the
`range` (the BOS is left to llama.cpp when the tokenizer adds it itself); the same check
applies. The tests execute every TEMPLATE with Go's own text/template (Ollama's engine) and
compare with the Jinja rendering (tests/export/test_modelfile_go.py).

`PARAMETER stop` lists the EOS token and the special token the template closes a message
with (`gguf_vocab.end_tokens`); where it closes none (DeepSeek-V3, GLM-4.5), the special
token that opens a user turn (`<｜User｜>`, `<|user|>`), with which such a model ends its own.
gpt-oss's harmony format has its own (`modelfile_harmony`).
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


def _specials(tokenizer) -> list[str]:
    names = {str(v) for v in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return sorted(names | set(tokenizer.all_special_tokens), key=len, reverse=True)


def _special_prefixes(tokenizer, texts: list[str]) -> list[str]:
    """The runs of whole special tokens every text starts with, longest first: candidates for
    the conversation's opening, written once (DeepSeek-V3's BOS, GLM-4.5's "[gMASK]<sop>").
    Longest first but not only the longest: Llama-3's texts all start with
    "<|begin_of_text|><|start_header_id|>", of which only the BOS opens the conversation."""
    out, specials = [""], _specials(tokenizer)
    while True:
        rest = [t[len(out[-1]) :] for t in texts]
        tok = next((s for s in specials if s and all(r.startswith(s) for r in rest)), None)
        if tok is None:
            return out[:0:-1]
        out.append(out[-1] + tok)


def _per_message(tokenizer) -> tuple[tuple[dict[str, tuple[str, str]], str] | None, str]:
    """(`_pieces`, the opening written once) for the tokenizer's chat template; (None, "") when
    it is not a per-message template."""
    found = _pieces(tokenizer)
    if found is not None:
        return found, ""
    alone = [_safe_render(tokenizer, [{"role": r, "content": _MARK}]) for r in ROLES]
    for prefix in _special_prefixes(tokenizer, alone) if all(alone) else []:
        found = _pieces(tokenizer, prefix)
        if found is not None:
            return found, prefix
    return None, ""


def _pieces(tokenizer, prefix: str = "") -> tuple[dict[str, tuple[str, str]], str] | None:
    """Per role (text before content, text after content) and the generation prompt, or None.
    With `prefix`, every rendering starts with it once (it is not part of a message)."""
    pieces = {}
    try:
        for role in ROLES:
            text = _render(tokenizer, [{"role": role, "content": _MARK}], False)
            if text.count(_MARK) != 1 or not text.startswith(prefix):
                return None
            pieces[role] = tuple(text[len(prefix) :].split(_MARK))
        convo = [{"role": r, "content": f"{r} says hi"} for r in ROLES[:2]]
        gen = _render(tokenizer, convo, True)
        plain = _render(tokenizer, convo, False)
        if not gen.startswith(plain):
            return None
        gen_prompt = gen[len(plain) :]
        # the check: concatenating per-message pieces reproduces Jinja exactly
        convo3 = [{"role": r, "content": f"{r} says hi"} for r in ROLES]
        want = _render(tokenizer, convo3, False)
        got = prefix + "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in convo3)
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
    found, prefix = _per_message(tokenizer)
    if found is None or any("{{" in s for p in found[0].values() for s in p) or "{{" in found[1]:
        log.warning("chat template is not a per-message template; writing Ollama's plain template")
        return PLAIN_TEMPLATE
    pieces, gen_prompt = found
    if prefix and prefix == tokenizer.bos_token and _adds_bos(tokenizer):
        prefix = ""  # the BOS llama.cpp (and so Ollama) adds itself when tokenizing
    # No "{{-" after literal text: Go's left trim would eat the newline a piece ends with.
    out = prefix + ("{{ range $i, $_ := .Messages }}" if prefix else "{{- range $i, $_ := .Messages }}")
    for k, role in enumerate(ROLES):
        kw = "if" if k == 0 else "else if"
        before, after = pieces[role]
        out += f'{{{{ {kw} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
    out += "{{ end }}"
    out += (
        f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}}}{gen_prompt}{{{{ end }}}}'
    )
    return out + "{{ end }}"


def _safe_render(tokenizer, messages) -> str | None:
    try:
        return _render(tokenizer, messages, False)
    except Exception:  # noqa: BLE001 — a template that fails here simply gives no prefix
        return None


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def stop_tokens(tokenizer) -> list[str]:
    """`gguf_vocab.end_tokens`, and, for templates that close no message with a special token
    (DeepSeek-V3, GLM-4.5: a turn ends where the next one opens), the special token that opens
    a user turn, which such models emit to end theirs."""
    out = end_tokens(tokenizer)
    if len(out) > 1 or not getattr(tokenizer, "chat_template", None):
        return out
    found, _ = _per_message(tokenizer)
    if found is not None:
        before_user = found[0]["user"][0]
        opener = next((s for s in _specials(tokenizer) if s and before_user.startswith(s)), None)
        if opener and opener not in out:
            out.append(opener)
    return out


def modelfile_text(gguf_path: str | Path, tokenizer) -> str:
    """The Modelfile for `gguf_path` (referenced relative to the Modelfile's folder)."""
    from greentune.export import modelfile_harmony

    name = Path(gguf_path).name
    harmony = modelfile_harmony.is_harmony(tokenizer)  # gpt-oss: its own template and stops
    template = modelfile_harmony.TEMPLATE if harmony else go_template(tokenizer)
    parts = [f"FROM ./{name}", f'TEMPLATE """{template}"""']
    for s in modelfile_harmony.STOPS if harmony else stop_tokens(tokenizer):
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
