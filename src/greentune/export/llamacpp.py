"""Run an exported GGUF in llama.cpp itself, in process, through the optional `xllamacpp` binding.

    from greentune.export import llamacpp
    if llamacpp.available():
        out = llamacpp.generate("runs/x/export/model-q4_k_m.gguf", "Return the", max_tokens=16)
        print(out.text, out.tokens_per_second)

Used by the demo to show the exported model running where the user will run it. The
binding binds a loopback port while a model is loaded; nothing leaves the machine.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """A llama.cpp completion: text, tokens generated, wall seconds, llama.cpp's decode tokens/s."""

    text: str
    n_tokens: int
    seconds: float
    tokens_per_second: float


def available() -> bool:
    """Whether the llama.cpp binding (`pip install xllamacpp`) is importable."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def generate(gguf_path: str | Path, prompt: str | list[int], max_tokens: int = 16, *, n_ctx: int = 512,
             n_threads: int = 2, temperature: float = 0.0) -> Generation:
    """Greedy (temperature 0) or sampled completion of `prompt` (text or token ids) by llama.cpp.

    Raises:
        UserError: the binding is missing, the file is missing, or llama.cpp refused the request.
    """
    if not available():
        raise UserError("running a GGUF needs the llama.cpp binding: pip install xllamacpp")
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"no GGUF file at {gguf_path}")
    import xllamacpp as x
    p = x.CommonParams()
    p.model.path = str(gguf_path)
    p.n_ctx = n_ctx
    p.cpuparams.n_threads = n_threads
    p.cpuparams_batch.n_threads = n_threads
    p.warmup = False
    p.verbosity = -1  # llama.cpp logs only errors; the caller prints what matters
    server = x.Server(p)
    try:
        t0 = time.perf_counter()
        r = server.handle_completions({"prompt": prompt, "max_tokens": int(max_tokens), "temperature": temperature,
                                       "cache_prompt": False})
        seconds = time.perf_counter() - t0
    finally:
        del server
    if "choices" not in r:
        raise UserError(f"llama.cpp refused the request: {str(r)[:200]}")
    choice = r["choices"][0]
    n = int(r.get("usage", {}).get("completion_tokens", 0))
    tps = float(r.get("timings", {}).get("predicted_per_second") or (n / seconds if seconds > 0 else 0.0))
    log.info("llama.cpp generated %d tokens in %.2f s", n, seconds)
    return Generation(text=choice.get("text", ""), n_tokens=n, seconds=seconds, tokens_per_second=tps)
