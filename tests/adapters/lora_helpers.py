"""Shared by the LoRA tests: make a fresh adapter non-zero, so it changes the model's output."""

import torch

from greentune.adapters.lora import LoRALinear


def randomise_lora(model, seed: int = 1) -> None:
    """Set every LoRALinear's B (zero at init) to small seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
