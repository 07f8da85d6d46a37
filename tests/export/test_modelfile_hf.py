"""Ollama Modelfile beside a GGUF, and the merged HF folder."""

from __future__ import annotations

import pytest
import torch

from greentune.errors import UserError
from greentune.export import validate_hf_dir, write_hf, write_modelfile
from greentune.export.modelfile import PLAIN_TEMPLATE, go_template

EXPECTED_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}"
    '{{ if eq .Role "system" }}<|system|>\n{{ .Content }}<|end|>\n'
    '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
    '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n'
    "{{ end }}"
    '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|assistant|>\n{{ end }}'
    "{{ end }}"
)


def test_modelfile_for_fixture_template(tmp_path, tokenizer):
    gguf = tmp_path / "model-q4_k_m.gguf"
    gguf.write_bytes(b"")
    path = write_modelfile(gguf, tokenizer)
    assert path == tmp_path / "model-q4_k_m.Modelfile"
    assert path.read_text() == (
        "FROM ./model-q4_k_m.gguf\n"
        f'TEMPLATE """{EXPECTED_TEMPLATE}"""\n'
        'PARAMETER stop "</s>"\n'
        'PARAMETER stop "<|end|>"\n'
    )


def test_template_for_the_fixture(tokenizer):
    # what Go's text/template renders from it is checked against Jinja in test_modelfile_go.py
    assert go_template(tokenizer) == EXPECTED_TEMPLATE


def test_templates_that_are_not_per_message_get_the_plain_one(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}SYS: default\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    assert go_template(tok) == PLAIN_TEMPLATE
    tok.chat_template = None
    assert go_template(tok) == PLAIN_TEMPLATE


def test_hf_merged_dir_logits_equal_adapted_model(tmp_path, scaled_llama_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(scaled_llama_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()
    out = write_hf(merged, tmp_path / "merged", tokenizer=tokenizer)
    assert validate_hf_dir(out) and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    copy = write_hf(out, tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in out.iterdir())


def test_hf_refuses_folders_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(UserError, match="safetensors"):
        write_hf(tmp_path, tmp_path / "out")


def test_export_dispatch(tmp_path, scaled_llama_dir):
    from greentune.export import export

    g = export(scaled_llama_dir, tmp_path, "gguf", quant="q8_0")
    assert g.name == "model-q8_0.gguf" and (tmp_path / "model-q8_0.Modelfile").read_text().startswith(
        "FROM ./model-q8_0.gguf\n"
    )
    assert export(scaled_llama_dir, tmp_path, "mlx", bits=4).name == "model-mlx-4bit"
    assert (export(scaled_llama_dir, tmp_path, "hf") / "model.safetensors").is_file()
    with pytest.raises(UserError, match="format"):
        export(scaled_llama_dir, tmp_path, "onnx")


HARMONY_JINJA = (  # the per-message core of gpt-oss's template (its header and channels left out)
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}{# <|channel|> #}"
)


def test_harmony_chat_format_gets_its_template_and_stops(tmp_path, tokenizer):
    import copy

    from greentune.export.modelfile_harmony import TEMPLATE

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = HARMONY_JINJA
    gguf = tmp_path / "model-mxfp4.gguf"
    gguf.write_bytes(b"")
    text = write_modelfile(gguf, tok).read_text()
    assert f'TEMPLATE """{TEMPLATE}"""' in text
    assert text.endswith('PARAMETER stop "<|return|>"\nPARAMETER stop "<|call|>"\n')
    assert "<|start|>user<|message|>{{ .Content }}<|end|>" in TEMPLATE
    assert TEMPLATE.count("{{ if") == TEMPLATE.count("{{ end }}") - 1  # range + ifs, all closed
