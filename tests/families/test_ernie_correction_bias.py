"""ERNIE-4.5-MoE's selection bias (`moe_statics.e_score_correction_bias`) is exported and applied.

The family matrix's ERNIE base has transformers' zero-initialised bias, which routes as if it
were absent. Here a bias large enough to change which experts run is set: llama.cpp runs the
f32 GGUF (`blk.N.exp_probs_b.bias`) as PyTorch runs the model, and the MLX export, whose
mlx_lm model drops the bias, is refused in one line.
"""

from __future__ import annotations

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file

from greentune.errors import UserError

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")
pytestmark = pytest.mark.slow


def test_the_bias_routes_in_llama_cpp_as_in_pytorch_and_mlx_refuses_it(tmp_path, family_base, banned):
    import shutil

    from transformers import AutoModelForCausalLM

    from greentune.export import write_mlx
    from greentune.export.gguf import write_gguf

    base = tmp_path / "ernie"
    shutil.copytree(family_base("ernie4_5_moe"), base)
    sd = load_file(base / "model.safetensors")
    names = [n for n in sd if n.endswith("e_score_correction_bias")]
    assert names
    g = torch.Generator().manual_seed(0)
    for n in names:  # probabilities are ~0.25 each; ±0.2 moves tokens to other experts
        sd[n] = (torch.rand(sd[n].shape, generator=g) - 0.5) * 0.4
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    ids = torch.tensor([list(range(5, 37))])
    with torch.no_grad():  # the bias changes the model: it is not a no-op a wrong export would hide
        with_bias = model(ids).logits
        for n, p in model.named_parameters():
            if n.endswith("e_score_correction_bias"):
                p.zero_()
        without = model(ids).logits
    assert (with_bias - without).abs().max() > 1e-2
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    path = write_gguf(base, tmp_path / "e.gguf", "f32")
    meta, tensors, _ = helpers.read_gguf(path)
    assert tensors["blk.1.exp_probs_b.bias"].shape == (4,)
    llama = helpers.Llama(path)
    try:
        _, agree, n = helpers.compare_with_torch(
            llama, model, [5, 6, 7, 8, 9, 10, 40, 41], banned, n=12, atol=1e-4
        )
    finally:
        llama.close()
    assert agree == n == 12

    with pytest.raises(UserError, match="mlx_lm drops .*e_score_correction_bias"):
        write_mlx(base, tmp_path / "mlx", bits=None, dtype="float32")
    assert not (tmp_path / "mlx").exists()
