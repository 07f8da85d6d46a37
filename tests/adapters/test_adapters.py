"""The adapter greentune saves is PEFT's: PEFT and plain transformers reproduce our logits."""

import pytest
import torch
from lora_helpers import randomise_lora

from greentune.adapters.lora import apply_lora, fuse_all_, trainable_parameters
from greentune.adapters.peft_format import load_lora_state_dict, read_adapter, save_adapter
from greentune.models.loader import load_model


def test_trainable_parameter_count_is_exact(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    wrapped = apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    assert len(wrapped) == 2 * 7
    h, kv, ff = 64, 32, 128  # hidden, kv dim (2 heads x 16), intermediate
    per_layer = 4 * (h + h) + 4 * (h + kv) * 2 + 4 * (h + h) + 4 * (h + ff) * 2 + 4 * (ff + h)
    assert sum(p.numel() for p in trainable_parameters(model).values()) == 2 * per_layer


def test_lora_starts_as_the_base(tiny_llama_dir):
    ids = torch.randint(0, 500, (2, 16))
    base = load_model(tiny_llama_dir)
    adapted = load_model(tiny_llama_dir)
    apply_lora(adapted, ["attn", "mlp"], rank=4, alpha=8)
    assert torch.equal(base(input_ids=ids).logits, adapted(input_ids=ids).logits)


@pytest.mark.parametrize("arch_fixture", ["tiny_llama_dir", "tiny_mixtral_dir"])
def test_peft_and_merged_reproduce_greentune_logits(request, tmp_path, arch_fixture):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(arch_fixture)
    ids = torch.randint(0, 500, (2, 24))
    model = load_model(model_dir)
    apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    randomise_lora(model)
    model.eval()
    ours = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", rank=4, alpha=8, dropout=0.0, base_model=str(model_dir))

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - peft_model.merge_and_unload()(input_ids=ids).logits).abs().max().item() <= 1e-5

    # load back into a fresh greentune model
    again = load_model(model_dir)
    apply_lora(again, ["attn", "mlp"], rank=4, alpha=8)
    _, sd = read_adapter(tmp_path / "adapter")
    load_lora_state_dict(again, sd)
    assert torch.equal(again.eval()(input_ids=ids).logits, ours)

    # merged HF folder loads in plain transformers with the same logits
    fuse_all_(model)
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (plain(input_ids=ids).logits - ours).abs().max().item() <= 1e-5
