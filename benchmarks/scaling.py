"""Data-parallel scaling: the same recipe on 1 and on N processes (`greentune train --nproc N`).

    python benchmarks/scaling.py [--nproc 2] [--steps 30] [--recipe RECIPE.yaml]

Without `--recipe` it builds a small Llama (4 layers, hidden 256, vocab 2048, tokenizer
trained here) and trains LoRA r16 on attention and MLP, batch 16 × 128 tokens, on stdlib
source. On a machine with N GPUs each process gets one GPU (nccl); on a CPU-only machine
the N processes share the cores (gloo), so expect no speed-up there: the number that
matters on CPU is the overhead of the collectives.

Prints, per process count: steady-state tokens/s (steps after the first 3), scaling vs 1
process, the training phase's J/token from the run's ledger (every rank's meters summed,
each device counted once) and whether those joules were measured or estimated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def build_default(work: Path, steps: int) -> Path:
    from transformers import AutoTokenizer

    from greentune.demo import corpus
    from greentune.models import tiny

    tiny.build_tokenizer(corpus.docstrings(limit_chars=300_000), work / "tok", vocab_size=2048)
    tok = AutoTokenizer.from_pretrained(work / "tok")
    tiny.build_tiny_model(
        "llama", work / "base", tokenizer=tok, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512
    )
    data = work / "code.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in corpus.source_snippets(limit_chars=400_000))
    )
    recipe = {
        "name": "scaling",
        "base_model": str(work / "base"),
        "data": {"train": str(data), "max_seq_len": 128},
        "method": {"lora": {"rank": 16, "alpha": 32, "targets": ["attn", "mlp"], "dropout": 0.0}},
        "train": {"steps": steps, "batch_size": 16, "lr": 1e-3, "warmup": 2, "checkpoint_every": steps},
        "energy": {"measure_savings": False, "interval_steps": 1},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def measure(recipe: Path, run_dir: Path, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "greentune", "train", str(recipe), "--run-dir", str(run_dir), "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, check=True)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][3:]
    tokens = sum(s["tokens_per_s"] * s["step_seconds"] for s in steps)
    seconds = sum(s["step_seconds"] for s in steps)
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    joules = sum(sum(r["joules"].values()) for r in train)
    total_tokens = steps[-1]["tokens"] if steps else 0
    sources = sorted({s for r in train for s in r["source"].values()})
    return {
        "nproc": nproc,
        "tokens_per_s": tokens / seconds,
        "j_per_token": joules / max(total_tokens, 1),
        "sources": "+".join(sources),
        "components": sorted({k for r in train for k in r["joules"]}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--recipe", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = args.recipe or build_default(work, args.steps)
        results = [measure(recipe, work / f"run-{n}", n) for n in (1, args.nproc)]
    base = results[0]["tokens_per_s"]
    print(f"{'processes':>9}  {'tokens/s':>9}  {'scaling':>7}  {'J/token':>8}  energy")
    for r in results:
        print(
            f"{r['nproc']:>9}  {r['tokens_per_s']:>9,.0f}  {r['tokens_per_s'] / base:>6.2f}×  "
            f"{r['j_per_token']:>8.4f}  {r['sources']} ({', '.join(r['components'])})"
        )


if __name__ == "__main__":
    main()
