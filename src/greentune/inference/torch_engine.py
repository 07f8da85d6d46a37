"""The `torch` engine: the PyTorch model (fp32 on CPU), the same measurements as llama.cpp's.

Prompt processing is one forward over the prompt (batch 1, KV cache built, as llama.cpp
does). Generation prefills all but the prompt's last token once, then each repeat feeds
that last token and decodes greedily, one forward per generated token, and crops the KV
cache back, so every repeat decodes exactly M tokens against the same prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class TorchEngine:
    """A Hugging Face causal LM on CPU (or the default device), in eval mode."""

    name = "torch"

    def __init__(self, model_dir: Path, threads: int):
        from greentune.evaluate import resolve_model
        from greentune.models.loader import default_device

        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        self.device = default_device()
        self.model, _, self.description, _ = resolve_model(model_dir, self.device)
        self.model.eval()
        p = next(self.model.parameters())
        self.format = f"{str(p.dtype).removeprefix('torch.').replace('float', 'fp')}"
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        self._cache = None
        self._prefix = 0

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def score(self, ids: list[int], targets: list[bool]) -> tuple[float, int]:
        logits = self.model(self._ids(ids)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, self._ids(ids)[0, 1:, None])[:, 0]
        mask = torch.tensor(targets[1:], dtype=torch.bool, device=self.device)
        return float(logp[mask].sum()), int(mask.sum())

    @torch.no_grad()
    def prompt(self, ids: list[int]) -> int:
        self.model(self._ids(ids), use_cache=True)
        return len(ids)

    @torch.no_grad()
    def prepare_generation(self, ids: list[int]) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache()
        self.model(self._ids(ids[:-1]), cache=self._cache, use_cache=True)
        self._prefix = len(ids) - 1

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> int:
        tok = self._ids(ids[-1:])
        for _ in range(int(n)):
            logits = self.model(tok, cache=self._cache, use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
        self._cache.crop(-int(n))  # back to the prompt prefix
        return int(n)

    def engine_tokens_per_s(self, phase: str) -> float | None:
        return None

    def close(self) -> None:
        torch.set_num_threads(self._threads_before)
        self.model = self._cache = None
