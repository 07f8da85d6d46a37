"""Ollama Modelfiles for the DeepSeek-V3 and GLM-4.5 chat formats.

Both open the conversation once with special tokens (DeepSeek-V3's BOS, GLM-4.5's
"[gMASK]<sop>") and close no message with a special token of its own (a turn ends where the
next opens). The templates (`chat_formats.py`) keep the published templates' structure for plain
system/user/assistant turns (their tool-call and reasoning branches left out): the Go
template written is their per-message equivalent, with the opening once before the
messages, and the stop tokens include the token that opens a user turn.
"""

from __future__ import annotations

import copy

import pytest
from chat_formats import with_format

from greentune.export.modelfile import PLAIN_TEMPLATE, go_template, stop_tokens

LAST = '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}'


@pytest.fixture
def deepseek_tokenizer(tokenizer):
    return with_format(tokenizer, "deepseek_v3")


@pytest.fixture
def glm_tokenizer(tokenizer):
    return with_format(tokenizer, "glm_4_5")


CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]


def test_deepseek_v3_template_and_stops(deepseek_tokenizer):
    tok = deepseek_tokenizer
    assert go_template(tok) == (
        "<｜begin▁of▁sentence｜>{{ range $i, $_ := .Messages }}"
        '{{ if eq .Role "system" }}{{ .Content }}'
        '{{ else if eq .Role "user" }}<｜User｜>{{ .Content }}'
        '{{ else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>'
        f"{{{{ end }}}}{LAST}<｜Assistant｜>{{{{ end }}}}{{{{ end }}}}"
    )
    # the Go template's output for CONVO, spelled out, is the Jinja rendering
    go = (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜>"
    )
    assert tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True) == go
    assert stop_tokens(tok) == ["<｜end▁of▁sentence｜>", "<｜User｜>"]


def test_glm_4_5_template_and_stops(glm_tokenizer):
    tok = glm_tokenizer
    assert go_template(tok) == (
        "[gMASK]<sop>{{ range $i, $_ := .Messages }}"
        '{{ if eq .Role "system" }}<|system|>\n{{ .Content }}'
        '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}'
        f"{{{{ end }}}}{LAST}<|assistant|>{{{{ end }}}}{{{{ end }}}}"
    )
    go = "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello.<|user|>\n2+2?<|assistant|>"
    assert tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True) == go
    assert stop_tokens(tok) == ["<|endoftext|>", "<|user|>"]


def test_an_opening_that_is_not_special_tokens_still_gets_the_plain_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "Chat:{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    assert go_template(tok) == PLAIN_TEMPLATE


def test_the_bos_the_tokenizer_adds_is_not_written_twice(deepseek_tokenizer):
    from tokenizers import processors

    tok = deepseek_tokenizer
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert go_template(tok).startswith("{{- range $i, $_ := .Messages }}")
