"""`greentune demo`: model reuse on real text, end to end, in a few minutes on 2 CPU cores.

1. A small base model stands in for "a model someone else already trained": a 1.3 M-parameter
   Llama pretrained here on the standard library's *docstrings* (English prose about code),
   built once and cached (~/.cache/greentune, or $GREENTUNE_CACHE) — no download.
2. The "client" wants Python *source code*: a held-out slice of stdlib source files.
3. greentune fine-tunes the base with LoRA on the client's data through the real pipeline
   (recipe → run dir → adapter → merged model), and the demo compares held-out perplexity of
   the base, the LoRA fine-tune, and the same architecture trained from scratch on the
   client's data for the same number of steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import yaml

from greentune.demo import corpus
from greentune.fsutil import atomic_dir, atomic_write_text
from greentune.models import tiny
from greentune.recipe import LORA_ALPHA, LORA_RANK, LORA_TARGETS
from greentune.run_dir import RunDir

log = logging.getLogger(__name__)

BASE_VERSION = "demo-base-v1"
BASE_SIZES = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, max_positions=512)
SEQ_LEN = 128


def cache_dir() -> Path:
    return Path(os.environ.get("GREENTUNE_CACHE", Path.home() / ".cache" / "greentune"))


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _full_training(
    model_dir: Path,
    data_path: Path,
    run_dir: Path,
    steps: int,
    lr: float,
    seed: int,
    progress: bool,
    eval_path: Path | None = None,
):
    """Train *all* parameters of the model in `model_dir` (pretraining or from-scratch baseline)."""
    from greentune.data import build_datasets
    from greentune.data.packing import BatchStream
    from greentune.models.loader import load_model, load_tokenizer
    from greentune.recipe import TrainConfig
    from greentune.train.loop import run_training

    tok = load_tokenizer(model_dir)
    train_data, eval_data = build_datasets(data_path, eval_path, tok, SEQ_LEN, True, seed, 0.05)
    torch.manual_seed(seed)
    model = load_model(model_dir)
    cfg = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=lr,
        warmup=min(20, steps // 10),
        schedule="cosine",
        seed=seed,
        checkpoint_every=steps,
        keep_checkpoints=1,
        weight_decay=0.01,
    )
    run_training(model, BatchStream(train_data, cfg.batch_size, seed), cfg, run_dir, progress=progress)
    return model, tok, eval_data


def build_base(progress: bool = True, steps: int = 300) -> Path:
    """Pretrain (once) the demo's base model on stdlib docstrings; return its cached folder."""
    target = cache_dir() / f"{BASE_VERSION}-s{steps}"
    if (target / "model.safetensors").exists():
        return target
    print(
        f"[demo] building the base model once (pretraining {steps} steps on stdlib docstrings; cached in "
        f"{target})"
    )
    work = cache_dir() / f".{BASE_VERSION}-work"
    texts = corpus.docstrings(limit_chars=3_000_000)
    with atomic_dir(target) as tmp:
        tok = tiny.build_tokenizer(texts, tmp, vocab_size=2048)
        tiny.build_tiny_model("llama", tmp, tokenizer=tok, seed=0, **BASE_SIZES)
        data = _write_jsonl(work / "docstrings.jsonl", texts)
        model, tok, _ = _full_training(tmp, data, work / "run", steps, 2e-3, 0, progress)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def client_data(out_dir: Path) -> tuple[Path, Path]:
    """The client's text: stdlib source code, split by file into train and held-out eval."""
    train = corpus.source_snippets(limit_chars=1_200_000, part=0, n_parts=2)
    held_out = corpus.source_snippets(limit_chars=120_000, part=1, n_parts=2)
    return _write_jsonl(out_dir / "data" / "train.jsonl", train), _write_jsonl(
        out_dir / "data" / "eval.jsonl", held_out
    )


def _recipe(
    out_dir: Path, name: str, base: Path, train_path: Path, eval_path: Path, steps: int, **sections
) -> Path:
    recipe = {
        "base_model": str(base),
        "name": name,
        "data": {"train": str(train_path), "eval": str(eval_path), "max_seq_len": SEQ_LEN, "pack": True},
        "method": {"lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)}},
        "train": {
            "steps": steps,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup": 10,
            "schedule": "cosine",
            "seed": 0,
            "checkpoint_every": max(10, steps // 3),
        },
        **sections,
    }
    path = out_dir / f"{name}.yaml"
    atomic_write_text(path, f"# greentune train {path}\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def _fresh_or_resume(run_dir: Path) -> bool:
    """Resume an interrupted demo run; start over after a finished one. Only a run dir greentune
    made is ever deleted: any other folder is left for `train` to refuse in one line."""
    from greentune.ownership import is_run_dir

    if RunDir(run_dir).summary.exists() and is_run_dir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
        return False
    return RunDir(run_dir).checkpoints.exists()


def _generate(run_dir: Path, gguf_path: Path, prompt: str) -> str | None:
    """A few greedy tokens from the exported GGUF in llama.cpp, metered into the run's ledger."""
    from greentune.energy import Factors, Ledger, Meter
    from greentune.export import llamacpp

    if not llamacpp.available():
        print("[demo] (llama.cpp binding xllamacpp not installed: skipping generation)")
        return None
    meter = Meter.auto()
    try:
        with meter.phase("generate") as window:
            text = llamacpp.generate(gguf_path, prompt, max_tokens=24).text
        Ledger(run_dir, Factors.for_region(None)).record(window.result)
    finally:
        meter.close()
    return text


def run_demo(out_dir: Path = Path("runs/demo"), quick: bool = False, progress: bool = True) -> dict:
    """Base → LoRA fine-tune (+ GGUF export, llama.cpp) vs from scratch; then the MoE path:
    upcycle the base to 4 experts, quantise it, train attention + expert LoRA with ReLoRA."""
    from greentune.evaluate import evaluate_path
    from greentune.pipeline import train

    t_start = time.perf_counter()
    out_dir = Path(
        out_dir
    ).resolve()  # recipes resolve paths against their own folder, so write absolute ones
    base = build_base(progress=progress, steps=60 if quick else 300)
    train_path, eval_path = client_data(out_dir)
    steps = 20 if quick else 150

    print(
        f"[demo] 1/3 LoRA fine-tune of the reused base on the client's code: {steps} steps, then GGUF q4_k_m"
    )
    lora_dir = out_dir / "lora"
    recipe = _recipe(
        out_dir,
        "demo-lora",
        base,
        train_path,
        eval_path,
        steps,
        export=[{"format": "gguf", "quant": "q4_k_m"}],
    )
    lora = train(recipe, run_dir=lora_dir, resume=_fresh_or_resume(lora_dir), progress=progress)

    print(
        f"[demo] 2/3 baseline: the same architecture trained from scratch on the client's data, {steps} steps"
    )
    scratch_dir = out_dir / "scratch-init"
    from greentune.models.loader import load_tokenizer

    tok = load_tokenizer(base)
    with atomic_dir(scratch_dir) as tmp:
        tiny.build_tiny_model("llama", tmp, tokenizer=tok, seed=1, **BASE_SIZES)
    scratch_model, _, _ = _full_training(
        scratch_dir, train_path, out_dir / "scratch", steps, 3e-3, 0, progress, eval_path=eval_path
    )
    with atomic_dir(out_dir / "scratch-model") as tmp:
        scratch_model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    moe_steps = 10 if quick else 60
    print(
        f"[demo] 3/3 all four techniques: upcycle the base to 4 experts (top-2), quantise it to q4_0, "
        f"train attention + expert LoRA with ReLoRA merges: {moe_steps} steps"
    )
    moe_dir = out_dir / "moe"
    moe_recipe = _recipe(
        out_dir,
        "demo-moe",
        base,
        train_path,
        eval_path,
        moe_steps,
        method={
            "quant_base": "q4_0",
            "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": ["attn", "experts"]},
            "relora": {"merge_every": max(5, moe_steps // 2), "optimizer_prune": 0.9, "restart_warmup": 5},
        },
        moe={"upcycle": {"experts": 4, "top_k": 2}, "aux_loss_coef": 0.01, "router": "full"},
        energy={"measure_savings": False},
    )
    moe = train(moe_recipe, run_dir=moe_dir, resume=_fresh_or_resume(moe_dir), progress=progress)

    rows = {
        "base (reused, no fine-tune)": evaluate_path(base, eval_path, max_seq_len=SEQ_LEN)["perplexity"],
        f"base + LoRA ({steps} steps)": lora.eval_ppl,
        f"from scratch ({steps} steps)": evaluate_path(
            out_dir / "scratch-model", eval_path, max_seq_len=SEQ_LEN
        )["perplexity"],
        f"upcycled 4x MoE, q4_0 base, expert LoRA + ReLoRA ({moe_steps} steps)": moe.eval_ppl,
    }
    gguf_path = Path(lora.outputs["export"][0])
    prompt = "class Reader:\n    def __init__(self"
    sample = _generate(lora_dir, gguf_path, prompt)

    print("\nHeld-out perplexity on the client's text (stdlib source files not seen in training):")
    for name, ppl in rows.items():
        print(f"  {name:<72} {ppl:10.2f}")
    if sample is not None:
        print(
            f"\nllama.cpp running {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.1f} MB), 24 greedy "
            "tokens "
            f"(a 1.3 M-parameter model: expect repetition):\n  {prompt!r} -> {sample[:120]!r}"
        )
    _print_energy(lora_dir)
    summary = {
        "perplexity": rows,
        "steps": steps,
        "moe_steps": moe_steps,
        "seconds": round(time.perf_counter() - t_start, 1),
        "lora_run": str(lora_dir),
        "moe_run": str(moe_dir),
        "gguf": str(gguf_path),
        "sample": sample,
    }
    atomic_write_text(out_dir / "demo.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"\n[demo] done in {summary['seconds']:.0f} s; reports: {lora_dir / 'report.html'}, "
        f"{moe_dir / 'report.html'}"
    )
    return summary


def _print_energy(run_dir: Path) -> None:
    """The LoRA run's bill and what it saved against a measured full fine-tune."""
    from greentune.energy import Factors, Ledger

    totals = Ledger(run_dir, Factors.for_region(None)).totals()
    tag = " (estimate: no energy counter on this machine)" if totals["estimate"] else ""
    print(f"\nEnergy of the LoRA run, all phases{tag}:")
    print(
        f"  {totals['it_kwh'] * 1000:.3f} Wh IT, {totals['facility_kwh'] * 1000:.3f} Wh facility, "
        f"{totals['kg_co2e'] * 1000:.3f} gCO2e, {totals['water_l'] * 1000:.2f} mL water (world grid)"
    )
    savings = RunDir(run_dir).savings
    if savings.exists():
        data = json.loads(savings.read_text())
        for row in data["rows"]:
            pct = row["saved_pct"]
            if pct is not None:
                print(f"  {row['quantity']}: saved {pct:.0f} % vs full fine-tuning ({row['method']})")
