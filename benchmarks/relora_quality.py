"""python benchmarks/relora_quality.py [--work DIR] [--steps 300] [--batch 8] [--merge-every 100] ...

Measures whether ReLoRA (merge-and-restart) closes the quality gap between LoRA and full
fine-tuning at a fixed step count and rank, with an fp32 base and with a q4_k base.

1. Pretrain a small Llama (hidden 256, intermediate 768, 4 layers, 4 heads / 2 KV, vocab 2048,
   ~4 M parameters; Q4_K's 256-weight super-blocks fit every linear) from random weights on
   standard-library docstrings (`greentune.demo.corpus.docstrings()`; byte-level BPE trained on
   the same text), full AdamW, lr 2e-3, cosine LR, 200 steps x 16 x 128 tokens by default.
   Cached in `--work/base-<steps>x<batch>` and reused on later runs.
2. Adapt it to standard-library *source* (`source_snippets(part=0, n_parts=2)` train,
   `part=1` held out) with the same steps, batch and rank (default 300 steps x 8 x 128, rank 8,
   alpha 16, attention + MLP) for:
   full fine-tuning (plain loop, every parameter trainable, greentune's schedule and clipping),
   LoRA, ReLoRA (fp32 base), LoRA (q4_k base), ReLoRA (q4_k base) — the last four through
   greentune's real pipeline (`greentune.pipeline.train` on a YAML recipe).
3. Report held-out eval loss of each and the fraction of the LoRA→full gap that ReLoRA
   closes: (loss_LoRA − loss_ReLoRA) / (loss_LoRA − loss_full), per base format
   (full fine-tuning is always fp32). The ReLoRA paper at 1.3 B reaches ~69 %; target ≥ 50 %.

Every run appends one JSON line to `--work/results.jsonl`, so tuning sweeps keep a record; a
variant whose settings match an earlier line is read from there instead of re-run. Runs with
one torch thread by default (`--threads`): on a shared 2-core CPU, OpenMP spin-waiting made
2 threads ~5x slower than 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import yaml

VOCAB, SEQ = 2048, 128
SIZES = dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, max_positions=512)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def prepare(work: Path, pretrain_steps: int, seed: int, batch: int = 16) -> Path:
    """Corpus files + pretrained base in `work`; returns the base dir."""
    from greentune.data import BatchStream, build_datasets
    from greentune.demo.corpus import docstrings, source_snippets
    from greentune.models.tiny import build_tiny_model, build_tokenizer
    from greentune.train.schedule import lr_at

    base = work / f"base-{pretrain_steps}x{batch}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "adapt_train.jsonl").exists():
        write_jsonl(work / "adapt_train.jsonl", source_snippets(limit_chars=1_500_000, part=0, n_parts=2))
        write_jsonl(work / "adapt_eval.jsonl", source_snippets(limit_chars=150_000, part=1, n_parts=2))
    if (base / "model.safetensors").exists():
        return base
    docs = docstrings(limit_chars=2_000_000)
    write_jsonl(work / "pretrain.jsonl", docs)
    tok = build_tokenizer(docs, work / "tok", VOCAB)
    model = build_tiny_model("llama", work / "init", tokenizer=tok, seed=seed, **SIZES)
    train, held = build_datasets(work / "pretrain.jsonl", None, tok, SEQ, True, seed, 0.02)
    print(
        f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"{len(train)} rows of {SEQ}, {pretrain_steps} steps x {batch}, lr 2e-3",
        flush=True,
    )
    stream = BatchStream(train, batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 2e-3, pretrain_steps, 30, "cosine", 0.1)
        b = next(stream)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(
                f"  pretrain step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    from greentune.train.loop import evaluate_loss

    print(f"  pretrain held-out docstring loss {evaluate_loss(model, held, 16)[0]:.3f}", flush=True)
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    return base


def full_finetune(base: Path, work: Path, args) -> float:
    """Every parameter trainable; same data, stream, schedule and clipping as greentune's loop."""
    from greentune.data import BatchStream, build_datasets
    from greentune.evaluate import load_eval_rows
    from greentune.models.loader import load_model, load_tokenizer
    from greentune.train.loop import evaluate_loss
    from greentune.train.schedule import lr_at

    tok = load_tokenizer(base)
    train, _ = build_datasets(
        work / "adapt_train.jsonl", work / "adapt_eval.jsonl", tok, SEQ, True, args.seed
    )
    rows = load_eval_rows(work / "adapt_eval.jsonl", tok, SEQ)
    torch.manual_seed(args.seed)
    model = load_model(base)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=args.lr_full, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=True
    )
    stream = BatchStream(train, args.batch, args.seed)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr_full, args.steps, args.warmup, "cosine", 0.1)
        b = next(stream)
        model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        ).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return evaluate_loss(model, rows, args.batch)[0]


def pipeline_run(base: Path, work: Path, name: str, quant: str, relora: bool, args) -> float:
    from greentune.pipeline import train

    method = {
        "quant_base": quant,
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": ["attn", "mlp"]},
    }
    if relora:
        method["relora"] = {
            "merge_every": args.merge_every,
            "optimizer_prune": args.prune,
            "restart_warmup": args.rewarm,
        }
    recipe = {
        "base_model": str(base),
        "data": {
            "train": str(work / "adapt_train.jsonl"),
            "eval": str(work / "adapt_eval.jsonl"),
            "max_seq_len": SEQ,
            "pack": True,
        },
        "method": method,
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr_relora if relora else args.lr_lora,
            "warmup": args.warmup,
            "schedule": "cosine",
            "seed": args.seed,
            "checkpoint_every": args.steps,
        },
        "energy": {"measure_savings": False},
    }
    import hashlib

    tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = work / "runs" / f"{name}-{tag}"  # distinct settings never share (or wipe) a run dir
    path = work / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return train(path, run_dir=run_dir, progress=False).eval_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gt-relora-bench"))
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr-full", type=float, default=5e-4)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--lr-relora", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--merge-every", type=int, default=100)
    ap.add_argument("--prune", type=float, default=0.9)
    ap.add_argument("--rewarm", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: on a shared 2-core machine OpenMP spin-waits make 2 threads "
        "~5x slower)",
    )
    ap.add_argument("--variants", default="full,lora,relora,lora_q4k,relora_q4k")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    base = prepare(args.work, args.pretrain_steps, args.seed, args.pretrain_batch)
    print(
        f"base ready ({time.perf_counter() - t0:.0f} s); adapting: {args.steps} steps x {args.batch} x "
        f"{SEQ}, "
        f"rank {args.rank}, alpha {args.alpha}, warmup {args.warmup}; ReLoRA merge every {args.merge_every}, "
        f"prune {args.prune} (joint), re-warm {args.rewarm}",
        flush=True,
    )
    jobs = {
        "full": lambda: full_finetune(base, args.work, args),
        "lora": lambda: pipeline_run(base, args.work, "lora", "none", False, args),
        "relora": lambda: pipeline_run(base, args.work, "relora", "none", True, args),
        "lora_q4k": lambda: pipeline_run(base, args.work, "lora_q4k", "q4_k", False, args),
        "relora_q4k": lambda: pipeline_run(base, args.work, "relora_q4k", "q4_k", True, args),
    }
    # ReLoRA and LoRA runs that share every setting are cached, so a sweep over ReLoRA settings re-uses them.
    cache_path = args.work / "results.jsonl"
    prior = [json.loads(line) for line in cache_path.read_text().splitlines()] if cache_path.exists() else []
    res = {}
    for name in args.variants.split(","):
        key = {k: v for k, v in vars(args).items() if k not in ("work", "variants", "threads")}
        if name == "full":
            key = {
                k: key[k]
                for k in ("pretrain_steps", "pretrain_batch", "steps", "batch", "lr_full", "warmup", "seed")
            }
        elif name.startswith("lora"):
            key = {
                k: key[k]
                for k in (
                    "pretrain_steps",
                    "pretrain_batch",
                    "steps",
                    "batch",
                    "rank",
                    "alpha",
                    "lr_lora",
                    "warmup",
                    "seed",
                )
            }
        else:
            key = {k: v for k, v in key.items() if k not in ("lr_full", "lr_lora")}
        hit = [r for r in prior if r["variant"] == name and r["key"] == key]
        if hit:
            res[name] = hit[-1]["eval_loss"]
            print(f"  {name:11} eval loss {res[name]:.4f} (cached)", flush=True)
            continue
        t = time.perf_counter()
        res[name] = jobs[name]()
        dt = time.perf_counter() - t
        with cache_path.open("a") as f:
            f.write(
                json.dumps({"variant": name, "key": key, "eval_loss": res[name], "seconds": round(dt, 1)})
                + "\n"
            )
        print(f"  {name:11} eval loss {res[name]:.4f} ({dt:.0f} s)", flush=True)

    print()
    print("| variant            | eval loss | ppl    |")
    print("|--------------------|-----------|--------|")
    labels = {
        "full": "full fine-tune",
        "lora": "LoRA (fp32)",
        "relora": "ReLoRA (fp32)",
        "lora_q4k": "LoRA (q4_k)",
        "relora_q4k": "ReLoRA (q4_k)",
    }
    for name, loss in res.items():
        print(f"| {labels[name]:18} | {loss:9.4f} | {math.exp(loss):6.2f} |")
    if "full" in res:
        for suffix, fmt in (("", "fp32"), ("_q4k", "q4_k")):
            lo, re_ = res.get("lora" + suffix), res.get("relora" + suffix)
            if lo is None or re_ is None:
                continue
            gap = lo - res["full"]
            frac = (lo - re_) / gap if gap > 0 else float("nan")
            print(f"{fmt} base: LoRA→full gap {gap:.4f}; ReLoRA closes {100 * frac:.1f} % (target ≥ 50 %)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
