"""The Modelfile TEMPLATEs run on Ollama's engine, Go's text/template, and render exactly what
the tokenizer's Jinja chat template renders, for each chat format greentune writes one for.

Conversations: several turns with a system prompt, no system prompt, a single user message,
and content holding Go-template and newline characters (`{{`, `\\n`), which must come out
verbatim (they are data, not template)."""

from __future__ import annotations

import pytest
from chat_formats import FORMATS, with_format
from go_template_engine import build, render

from greentune.export.modelfile import PLAIN_TEMPLATE, go_template
from greentune.export.modelfile_harmony import TEMPLATE as HARMONY

CONVERSATIONS = {
    "turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ],
    "no system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ],
    "one message": [{"role": "user", "content": "Hi"}],
    "template characters": [{"role": "user", "content": "say {{ .System }} and\nthen }}"}],
}


@pytest.fixture(scope="module")
def go_exe(tmp_path_factory):
    return build(tmp_path_factory.mktemp("go-template"))


@pytest.mark.parametrize("convo", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("fmt", ["tiny", *FORMATS], ids=str)
def test_go_renders_what_jinja_renders(go_exe, tokenizer, fmt, convo):
    tok = tokenizer if fmt == "tiny" else with_format(tokenizer, fmt)
    template = go_template(tok)
    assert template != PLAIN_TEMPLATE, f"{fmt}: no per-message template was derived"
    messages = CONVERSATIONS[convo]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render(go_exe, template, messages) == want


def test_the_plain_template_renders_the_prompt(go_exe):
    assert render(go_exe, PLAIN_TEMPLATE, [], system="Be brief.", prompt="Hi") == "Be brief.\n\nHi"
    assert render(go_exe, PLAIN_TEMPLATE, [], prompt="Hi") == "Hi"


def test_the_harmony_template_writes_gpt_oss_messages(go_exe):
    assert render(go_exe, HARMONY, CONVERSATIONS["turns"]) == (
        "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
        "<|start|>user<|message|>2+2?<|end|>"
        "<|start|>assistant"
    )
