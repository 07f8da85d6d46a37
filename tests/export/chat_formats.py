"""Chat formats for the Modelfile tests: the published templates' structure for plain
system/user/assistant turns (their tool-call and reasoning branches left out), each with the
special tokens its tokenizer declares, applied to a copy of the session's tiny tokenizer."""

from __future__ import annotations

import copy

DEEPSEEK_V3 = (
    "{% set ns = namespace(system_prompt='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}"
    "{% endfor %}{{ bos_token }}{{ ns.system_prompt }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
GLM_4_5 = (
    "[gMASK]<sop>{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Llama-3-Instruct's template (the BOS on the first message)
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML as OLMo-2 / SmolLM / Qwen without a default system prompt write it
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

FORMATS = {
    "deepseek_v3": (
        DEEPSEEK_V3,
        {
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"],
        },
    ),
    "glm_4_5": (
        GLM_4_5,
        {
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"],
        },
    ),
    "llama_3": (
        LLAMA_3,
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        },
    ),
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}),
}


def with_format(tokenizer, name: str):
    """A copy of `tokenizer` with format `name`'s chat template and special tokens."""
    template, specials = FORMATS[name]
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(specials)
    tok.chat_template = template
    return tok
