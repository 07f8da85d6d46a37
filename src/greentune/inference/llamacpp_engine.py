"""The `llamacpp` engine: an exported GGUF in llama.cpp (xllamacpp, in process).

Prompt processing is one request over the prompt with llama.cpp's cache off, so all N
tokens are evaluated as one batch. Generation first caches the prompt, then asks for M
greedy tokens with end-of-generation ignored, so each request decodes exactly M tokens
(one forward per token; the cached prompt is reused). Perplexity comes from
`LlamaCpp.score`: llama.cpp's log-probabilities of the held-out tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from greentune.export.llamacpp import LlamaCpp, gguf_preset

log = logging.getLogger(__name__)


class LlamaCppEngine:
    """One GGUF, loaded once, for scoring, prompt processing and generation."""

    name = "llamacpp"

    def __init__(self, gguf: Path, n_ctx: int, threads: int):
        self.gguf = Path(gguf)
        self.llm = LlamaCpp(self.gguf, n_ctx=n_ctx, n_threads=threads)
        self.format = gguf_preset(self.gguf)
        self.description = str(self.gguf)
        self.model_bytes = self.gguf.stat().st_size
        self.reported: dict[str, list[tuple[int, float]]] = {"prompt": [], "generate": []}

    def score(self, ids: list[int], targets: list[bool]) -> tuple[float, int]:
        """(Σ log p, count) of the target tokens of one row."""
        return self.llm.score(ids, targets)

    def prompt(self, ids: list[int]) -> int:
        r = self.llm.complete({"prompt": ids, "max_tokens": 0, "cache_prompt": False})
        t = r.get("timings", {})
        self.reported["prompt"].append((int(t.get("prompt_n", len(ids))), float(t.get("prompt_ms", 0.0))))
        return len(ids)

    def prepare_generation(self, ids: list[int]) -> None:
        self.llm.complete({"prompt": ids, "max_tokens": 0, "cache_prompt": True})

    def generate(self, ids: list[int], n: int) -> int:
        r = self.llm.complete({"prompt": ids, "max_tokens": int(n), "cache_prompt": True, "ignore_eos": True})
        t = r.get("timings", {})
        got = int(r.get("usage", {}).get("completion_tokens", t.get("predicted_n", 0)))
        self.reported["generate"].append((int(t.get("predicted_n", got)), float(t.get("predicted_ms", 0.0))))
        return got

    def engine_tokens_per_s(self, phase: str) -> float | None:
        """llama.cpp's own tokens/s over its compute of `phase` (its timings), for comparison."""
        n = sum(k for k, _ in self.reported[phase])
        ms = sum(m for _, m in self.reported[phase])
        return n / (ms / 1000) if ms > 0 else None

    def close(self) -> None:
        self.llm.close()
