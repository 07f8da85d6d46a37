"""Build small models and tokenizers locally, so tests and the demo never touch a hub.

`build_tokenizer` trains a byte-level BPE (GPT-2 pre-tokenisation, so llama.cpp knows
it as pre-tokenizer "gpt-2") on given texts. `build_tiny_model` writes a randomly
initialised Hugging Face checkpoint (safetensors) of a named architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on `texts` and save it in HF layout at `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<unk>", "<pad>"] + (["<|end|>"] if chat_template else [])
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    experts: int = 4,
    top_k: int = 2,
    max_positions: int = 256,
    tokenizer=None,
):
    """A small config of a named architecture: llama | mistral | mixtral | qwen2 | qwen2_moe | qwen3 |
    qwen3_moe | olmoe."""
    import transformers as tf

    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **ids,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return tf.MixtralConfig(
            **common, num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // heads)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            num_experts=experts,
            num_experts_per_tok=top_k,
            head_dim=hidden // heads,
            moe_intermediate_size=intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def build_tiny_model(arch: str, out_dir: str | Path, tokenizer=None, seed: int = 0, **sizes):
    """Write a randomly initialised checkpoint (config + model.safetensors [+ tokenizer]) to `out_dir`."""
    from transformers import AutoModelForCausalLM

    vocab = len(tokenizer) if tokenizer is not None else sizes.pop("vocab_size", 512)
    sizes.pop("vocab_size", None)
    config = tiny_config(arch, vocab_size=vocab, tokenizer=tokenizer, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model
