"""Export quality: held-out perplexity of GGUF f16 vs greentune's 4-bit vs llama.cpp's own quantiser.

    python benchmarks/export_quality.py                 # ~30 min on 2 busy CPU cores
    python benchmarks/export_quality.py --steps 20 --eval-tokens 128   # smoke run

1. Trains a small Llama (hidden 256, 4 layers, ff 768, vocab 1024; every row a multiple
   of 256 so K-quants apply everywhere) from scratch on standard-library docstrings
   (`greentune.demo.corpus.docstrings`, part 0 of 8 held out).
2. Exports it with greentune to GGUF f16, q8_0, q4_0 and q4_k_m.
3. Where `llama-cpp-python` is importable, quantises *our f16 GGUF* with llama.cpp's own
   quantiser (`llama_cpp.llama_model_quantize`) to Q4_0 and Q4_K_M. `llama-cpp-python`
   compiles llama.cpp at install (~14 min on 2 cores), so it is not a dependency; without
   it those rows are reported as skipped.
4. Every file is evaluated by llama.cpp itself (xllamacpp, in process): perplexity over
   the held-out tokens in windows of `--ctx`, each token's log-probability read from
   llama.cpp's raw distribution (the target is forced with a logit bias, which affects
   sampling only). The float PyTorch model's perplexity is printed as a reference.

Prints one row per file: type, perplexity, Δ vs f16, bits per weight (tensor bytes × 8 /
parameters) and file size. Target (issue 6): greentune's q4_k_m Δ ≤ llama.cpp's Q4_K_M Δ.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def train_model(out_dir: Path, steps: int, seq: int, batch: int, seed: int = 0):
    from transformers import AutoTokenizer

    from greentune.demo import corpus
    from greentune.models import tiny

    train_texts = corpus.docstrings(limit_chars=1_500_000, part=None)
    held = set(corpus.docstrings(limit_chars=10**9, part=0, n_parts=8))
    train_texts = [t for t in train_texts if t not in held]
    tok_dir = out_dir / "tok"
    tiny.build_tokenizer(train_texts, tok_dir, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny.build_tiny_model(
        "llama",
        out_dir / "model",
        tokenizer=tok,
        hidden=256,
        layers=4,
        heads=4,
        kv_heads=2,
        intermediate=768,
        max_positions=512,
        seed=seed,
    )
    ids = [i for t in train_texts for i in tok(t + "\n")["input_ids"]]
    data = torch.tensor(ids)
    print(
        f"training: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"{len(ids) / 1e6:.2f} M train tokens, {steps} steps × {batch}×{seq}",
        flush=True,
    )
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out_dir / "model")
    tok.save_pretrained(out_dir / "model")
    return out_dir / "model", tok, sorted(held)


def held_out_windows(tok, texts: list[str], n_tokens: int, ctx: int) -> list[list[int]]:
    ids = [i for t in texts for i in tok(t + "\n")["input_ids"]]
    ids = ids[: n_tokens + n_tokens // (ctx - 1) + 1]
    return [ids[i : i + ctx] for i in range(0, len(ids) - 1, ctx) if len(ids[i : i + ctx]) > 1]


def ppl_torch(model_dir: Path, windows) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            nll -= float(logp.gather(1, x[0, 1:, None]).sum())
            n += len(w) - 1
    return math.exp(nll / n)


def ppl_llamacpp(path: Path, windows, ctx: int) -> float:
    """Perplexity computed by llama.cpp: per position, force the next token and read its raw logprob."""
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = str(path)
    p.n_ctx = ctx + 8
    p.cpuparams.n_threads = 2
    p.cpuparams_batch.n_threads = 2
    p.warmup = False
    server = x.Server(p)
    nll, n = 0.0, 0
    for w in windows:
        for j in range(1, len(w)):
            r = server.handle_completions(
                {
                    "prompt": w[:j],
                    "max_tokens": 1,
                    "temperature": 0,
                    "n_probs": 1,
                    "cache_prompt": True,
                    "logit_bias": [[int(w[j]), 100.0]],
                    "samplers": ["logit_bias", "top_k"],
                }
            )
            content = r["choices"][0]["logprobs"]["content"]
            assert content and content[0]["id"] == w[j], json.dumps(r)[:300]
            nll -= content[0]["logprob"]
            n += 1
    del server
    return math.exp(nll / n)


def gguf_stats(path: Path) -> tuple[float, int]:
    """(bits per weight over all tensors, file bytes)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    n_params = sum(int(np.prod(t.shape)) for t in r.tensors)
    n_bytes = sum(int(t.n_bytes) for t in r.tensors)
    return 8.0 * n_bytes / n_params, path.stat().st_size


def llamacpp_quantize(src: Path, dst: Path, ftype_name: str) -> Path | None:
    """Quantise with llama.cpp's own quantiser, or None when llama-cpp-python is missing."""
    try:
        import llama_cpp
    except ImportError:
        return None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=128, help="evaluation window (tokens)")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    from greentune.export import export_gguf

    random.seed(0)
    work = args.out or Path(tempfile.mkdtemp(prefix="gt-export-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, tok, held = train_model(work, args.steps, args.seq, args.batch)
    windows = held_out_windows(tok, held, args.eval_tokens, args.ctx)
    n_eval = sum(len(w) - 1 for w in windows)
    print(f"held-out: {n_eval} tokens in {len(windows)} windows of ≤ {args.ctx}", flush=True)
    ref = ppl_torch(model_dir, windows)
    print(f"PyTorch fp32 perplexity: {ref:.4f}", flush=True)

    files: list[tuple[str, Path | None]] = []
    for q in ("f16", "q8_0", "q4_0", "q4_k_m"):
        files.append((f"greentune {q}", export_gguf(model_dir, work / f"gt-{q}.gguf", q).path))
    f16 = work / "gt-f16.gguf"
    for name in ("Q4_0", "Q4_K_M"):
        files.append((f"llama.cpp {name}", llamacpp_quantize(f16, work / f"lc-{name.lower()}.gguf", name)))

    rows, base = [], None
    for label, path in files:
        if path is None:
            rows.append(
                {
                    "file": label,
                    "skipped": "llama-cpp-python is not installed "
                    "(pip install llama-cpp-python; compiles ~14 min)",
                }
            )
            print(f"{label:22s} skipped: llama-cpp-python not installed", flush=True)
            continue
        t0 = time.time()
        ppl = ppl_llamacpp(path, windows, args.ctx)
        bpw, size = gguf_stats(path)
        base = ppl if base is None else base
        row = {
            "file": label,
            "ppl": ppl,
            "delta_vs_f16": ppl - base,
            "bits_per_weight": bpw,
            "bytes": size,
            "eval_s": time.time() - t0,
        }
        rows.append(row)
        print(
            f"{label:22s} ppl {ppl:9.4f}  Δ {ppl - base:+8.4f}  {bpw:5.2f} bpw  {size / 1e6:7.2f} MB "
            f"({row['eval_s']:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps({"pytorch_fp32_ppl": ref, "eval_tokens": n_eval, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
