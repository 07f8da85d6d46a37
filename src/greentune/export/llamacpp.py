"""Run an exported GGUF in llama.cpp itself, in process, through the optional `xllamacpp` binding.

    from greentune.export import llamacpp
    if llamacpp.available():
        out = llamacpp.generate("runs/x/export/model-q4_k_m.gguf", "Return the", max_tokens=16)
        print(out.text, out.tokens_per_second)

        with llamacpp.LlamaCpp(path, n_ctx=512, n_threads=1) as llm:   # one load, many requests
            logprob_sum, n = llm.score(token_ids, targets)               # teacher-forced log-likelihood
            r = llm.complete({"prompt": token_ids, "max_tokens": 64, "ignore_eos": True})

Used by the demo to show the exported model running where the user will run it, and by
`greentune eval --engine llamacpp`. The binding binds a loopback port while a model is
loaded; nothing leaves the machine.

Scoring (held-out perplexity from llama.cpp's own logits): llama.cpp's server has no prompt
log-probabilities (``echo`` is refused), so `score` makes llama.cpp *decode* the held-out
tokens one by one, forced by a token-level grammar (``root ::= <[id]> <[id]> ...``), and
reads each token's log-probability from ``n_probs``. With ``post_sampling_probs`` off that
log-probability is the softmax of the raw logits over the whole vocabulary, before any
sampler (grammar, bias) runs, i.e. log p(token | prefix) exactly. A grammar cannot force an
end-of-generation token in its middle, so a sequence is scored in segments that each end at
such a token: the grammar forces the segment, and a logit bias picks that token once the
grammar is complete. The prefix stays in llama.cpp's cache (``cache_prompt``), so every
token is evaluated once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from greentune.errors import UserError

log = logging.getLogger(__name__)

#: Token texts llama.cpp also treats as end-of-generation when they are in the vocabulary
#: (src/llama-vocab.cpp, the special_eog_ids heuristics).
EOG_TEXTS = (
    "</s>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<|end▁of▁sentence|>",
    "<｜end▁of▁sentence｜>",
)
_FORCE_BIAS = 1.0e4  # logit bias that makes the sampler pick the one token the grammar leaves open


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


def require_gguf(gguf_path: Path) -> None:
    """UserError unless the binding is importable and `gguf_path` is a GGUF file."""
    if not available():
        raise UserError("running a GGUF needs the llama.cpp binding: pip install xllamacpp")
    if not gguf_path.is_file():
        raise UserError(f"no GGUF file at {gguf_path}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_path} is not a GGUF file (no GGUF magic)")


def eog_token_ids(gguf_path: str | Path) -> set[int]:
    """Token ids llama.cpp ends generation on: the file's eos/eot/eom ids and the known EOG texts."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids: set[int] = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        field = reader.get_field(key)
        if field is not None:
            ids.add(int(field.contents()))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        ids.update(i for i, t in enumerate(tokens.contents()) if t in EOG_TEXTS)
    return ids


def gguf_preset(path: str | Path) -> str:
    """The file's preset (f16, q8_0, q4_k_m, ...) from `general.file_type`, else its stem's suffix."""
    from gguf import GGUFReader

    from greentune.export.gguf_quant import FILE_TYPE

    path = Path(path)
    field = GGUFReader(str(path)).get_field("general.file_type")
    if field is not None:
        name = {int(v): k for k, v in FILE_TYPE.items()}.get(int(field.contents()))
        if name:
            return name
    return path.stem.rsplit("-", 1)[-1].lower()


def gguf_context_length(path: str | Path) -> int | None:
    """`<arch>.context_length` of the file (the context the model was built for), or None."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    field = reader.get_field(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field.contents()) if field is not None else None


class LlamaCpp:
    """One GGUF loaded in llama.cpp (an in-process `xllamacpp.Server`), for many requests.

    Raises:
        UserError: the binding is missing, or the file is missing or not a GGUF.
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 512, n_threads: int = 2):
        self.path = Path(gguf_path)
        require_gguf(self.path)
        import xllamacpp as x

        p = x.CommonParams()
        p.model.path = str(self.path)
        p.n_ctx = int(n_ctx)
        p.n_parallel = 1
        p.cpuparams.n_threads = int(n_threads)
        p.cpuparams_batch.n_threads = int(n_threads)
        p.warmup = False
        p.verbosity = -1  # llama.cpp logs only errors; the caller prints what matters
        self.n_ctx = int(n_ctx)
        self._eog: set[int] | None = None
        try:
            self._server = x.Server(p)
        except Exception as err:  # llama.cpp could not load the file
            raise UserError(f"llama.cpp could not load {self.path}: {err}") from None

    def complete(self, request: dict) -> dict:
        """One `/completion` request (temperature 0 unless given); the response, or UserError."""
        r = self._server.handle_completions({"temperature": 0.0, **request})
        if "choices" not in r:
            raise UserError(f"llama.cpp refused the request: {str(r)[:200]}")
        return r

    @property
    def eog(self) -> set[int]:
        if self._eog is None:
            self._eog = eog_token_ids(self.path)
        return self._eog

    def score(self, ids: list[int], targets: list[bool] | None = None) -> tuple[float, int]:
        """Σ log p(ids[i] | ids[:i]) over positions i ≥ 1 where `targets[i]`, and how many (see module doc).

        `ids` must fit the context (`n_ctx`); every log-probability is llama.cpp's own.
        """
        ids = [int(t) for t in ids]
        if len(ids) >= self.n_ctx:
            raise UserError(
                f"a scored row of {len(ids)} tokens does not fit llama.cpp's context of {self.n_ctx}"
            )
        targets = targets if targets is not None else [True] * len(ids)
        total, count, pos = 0.0, 0, 1
        while pos < len(ids):
            end = pos
            while end < len(ids) and ids[end] not in self.eog:
                end += 1
            forced = ids[pos:end]
            stop = ids[end] if end < len(ids) else None
            request = {
                "prompt": ids[:pos],
                "max_tokens": len(forced) + (stop is not None),
                "n_probs": 1,
                "cache_prompt": True,
                "post_sampling_probs": False,
            }
            if forced:
                request["grammar"] = "root ::= " + " ".join(f"<[{t}]>" for t in forced)
            if stop is not None:
                request["logit_bias"] = [[stop, _FORCE_BIAS]]
            content = self.complete(request)["choices"][0].get("logprobs", {}).get("content", [])
            expected = forced + ([stop] if stop is not None else [])
            got = [int(c["id"]) for c in content]
            if got != expected:
                raise UserError(
                    f"llama.cpp did not decode the forced tokens of {self.path.name} "
                    f"(expected {expected[:8]}..., got {got[:8]}...)"
                )
            for i, c in enumerate(content):
                if targets[pos + i]:
                    total += float(c["logprob"])
                    count += 1
            pos += len(expected)
        return total, count

    def close(self) -> None:
        server, self._server = getattr(self, "_server", None), None
        del server

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate(
    gguf_path: str | Path,
    prompt: str | list[int],
    max_tokens: int = 16,
    *,
    n_ctx: int = 512,
    n_threads: int = 2,
    temperature: float = 0.0,
) -> Generation:
    """Greedy (temperature 0) or sampled completion of `prompt` (text or token ids) by llama.cpp.

    Raises:
        UserError: the binding is missing, the file is missing, or llama.cpp refused the request.
    """
    with LlamaCpp(gguf_path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        t0 = time.perf_counter()
        r = llm.complete(
            {
                "prompt": prompt,
                "max_tokens": int(max_tokens),
                "temperature": temperature,
                "cache_prompt": False,
            }
        )
        seconds = time.perf_counter() - t0
    choice = r["choices"][0]
    n = int(r.get("usage", {}).get("completion_tokens", 0))
    tps = float(r.get("timings", {}).get("predicted_per_second") or (n / seconds if seconds > 0 else 0.0))
    log.info("llama.cpp generated %d tokens in %.2f s", n, seconds)
    return Generation(text=choice.get("text", ""), n_tokens=n, seconds=seconds, tokens_per_second=tps)
