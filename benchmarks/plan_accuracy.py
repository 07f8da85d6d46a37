"""How close is `greentune plan` to what a run measures? Predicted vs measured time and energy.

    python benchmarks/plan_accuracy.py [--work DIR] [--steps 60] [--no-calibrate] [--json OUT]

For three recipes run on this machine — LoRA on a dense llama, QLoRA (q4_k base) on a
Mixtral-architecture MoE, ReLoRA on a dense llama — it

1. calibrates the planner on this machine (`greentune plan --calibrate`, unless
   --no-calibrate: then the stored calibration, or the defaults, are used);
2. plans each recipe with `--hardware this` and takes the estimate of the recipe's own
   technique: predicted training seconds and IT kWh;
3. runs the recipe with `greentune.pipeline.train` and reads the measured training
   seconds and joules from the run's `metrics.jsonl` (sum of per-step seconds and joules),
   else its `ledger.jsonl` (phases named "train*", which include in-loop evaluation), else
   it meters the whole `train()` call itself; the table says which;
4. prints the table of predicted vs measured, the ratio, and whether it is within the
   ±25 % target of issue 7.

Tiny models and data are built locally (greentune.models.tiny, stdlib docstrings), so it
needs no network. It takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

TARGET = 0.25
SIZES = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688)


def _build(work: Path) -> dict:
    """Tokenizer, a dense llama and a Mixtral-architecture MoE, and a jsonl of real text."""
    from greentune.demo import corpus
    from greentune.models import tiny

    texts = corpus.docstrings(limit_chars=400_000)
    tok = tiny.build_tokenizer(texts, work / "tokenizer", vocab_size=2048)
    paths = {"data": work / "train.jsonl"}
    with paths["data"].open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    for arch in ("llama", "mixtral"):
        d = work / f"tiny-{arch}"
        if not (d / "config.json").exists():
            extra = dict(experts=4, top_k=2) if arch == "mixtral" else {}
            tiny.build_tiny_model(arch, d, tokenizer=tok, max_positions=512, **SIZES, **extra)
        paths[arch] = d
    return paths


def _recipes(work: Path, paths: dict, steps: int) -> dict[str, Path]:
    common = {
        "data": {"train": str(paths["data"]), "max_seq_len": 256},
        "train": {"steps": steps, "batch_size": 4, "grad_accum": 1, "warmup": 5, "checkpoint_every": 10_000},
        "energy": {"region": "WORLD"},
    }
    specs = {
        "lora-dense": {
            "base_model": str(paths["llama"]),
            "method": {"quant_base": "none", "lora": {"rank": 16, "targets": ["attn", "mlp"]}},
        },
        "qlora-moe": {
            "base_model": str(paths["mixtral"]),
            "method": {"quant_base": "q4_k", "lora": {"rank": 16, "targets": ["attn", "experts"]}},
        },
        "relora-dense": {
            "base_model": str(paths["llama"]),
            "method": {
                "quant_base": "none",
                "lora": {"rank": 16, "targets": ["attn", "mlp"]},
                "relora": {"merge_every": max(1, steps // 3)},
            },
        },
    }
    out = {}
    for name, spec in specs.items():
        p = work / f"{name}.yaml"
        p.write_text(
            "# python benchmarks/plan_accuracy.py\n" + yaml.safe_dump({**common, **spec, "name": name})
        )
        out[name] = p
    return out


def _predict(recipe: Path):
    from greentune.plan.catalogue import model_facts
    from greentune.plan.command import read_recipe
    from greentune.plan.recommend import plan

    rec = read_recipe(recipe)
    facts, label = model_facts(rec.base_model)
    r = plan(
        facts,
        label,
        workload=rec.workload(),
        hardware="this",
        site=rec.site(),
        like=rec.technique(),
        extra=[rec.technique()],
    )
    return r.estimates[0], r.calibrated


def _measure(recipe: Path, run_dir: Path) -> dict:
    from greentune.pipeline import train

    meter = None
    try:
        from greentune.energy.meter import Meter

        meter = Meter.auto(scope="self")
    except Exception:  # noqa: BLE001
        pass
    window = meter.start("benchmark") if meter else None
    t0 = time.perf_counter()
    result = train(recipe, run_dir=run_dir, progress=False)
    wall = time.perf_counter() - t0
    whole = window.end() if window else None
    if meter:
        meter.close()

    def jsonl(name):
        p = run_dir / name
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    steps = [r for r in jsonl("metrics.jsonl") if "step_seconds" in r and "step_joules" in r]
    ledger = [r for r in jsonl("ledger.jsonl") if str(r.get("phase", "")).startswith("train")]
    if steps:  # optimiser steps only: the ledger's train phase also holds in-loop evaluation
        seconds = sum(float(r["step_seconds"]) for r in steps)
        joules = sum(float(r["step_joules"]) for r in steps)
        how = "metrics.jsonl (sum of step_seconds, step_joules)"
    elif ledger:
        seconds = sum(float(r.get("seconds", 0)) for r in ledger)
        joules = sum(sum(r.get("joules", {}).values()) for r in ledger)
        how = "ledger (train phases, incl. in-loop eval)"
    else:
        seconds = result.seconds or wall
        joules = whole.total_joules * seconds / whole.seconds if whole and whole.seconds else float("nan")
        how = "own meter over train(), scaled to the loop's seconds (no ledger)"
    return {"seconds": seconds, "it_kwh": joules / 3.6e6, "tokens": result.tokens, "how": how}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/plan-accuracy", help="folder for models, data and runs")
    ap.add_argument("--steps", type=int, default=60, help="training steps per recipe")
    ap.add_argument(
        "--no-calibrate", action="store_true", help="use the stored calibration instead of measuring"
    )
    ap.add_argument("--calibrate-seconds", type=float, default=20.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ns = ap.parse_args(argv)
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)

    if not ns.no_calibrate:
        from greentune.plan.calibrate import run_calibration, store_calibration
        from greentune.plan.hardware import find_hardware

        cal = run_calibration(find_hardware("this"), seconds=ns.calibrate_seconds)
        store_calibration(cal)
        print(f"calibration: utilisation {cal.utilisation:.3f}, {cal.power_w:.1f} W ({cal.power_source})")
    paths = _build(work)
    rows = []
    for name, recipe in _recipes(work, paths, ns.steps).items():
        est, calibrated = _predict(recipe)
        meas = _measure(recipe, work / "runs" / name)
        rows.append(
            {
                "recipe": name,
                "technique": est.technique.name,
                "calibrated": calibrated,
                "predicted_s": est.seconds,
                "measured_s": meas["seconds"],
                "predicted_kwh": est.it_kwh,
                "measured_kwh": meas["it_kwh"],
                "tokens": meas["tokens"],
                "measured_by": meas["how"],
            }
        )

    print(
        f"\n{'recipe':<14}{'pred s':>9}{'meas s':>9}{'ratio':>7}{'pred Wh':>10}{'meas Wh':>10}{'ratio':>7}  "
        "within ±25 %"
    )
    ok_all = True
    for r in rows:
        rt = r["predicted_s"] / r["measured_s"] if r["measured_s"] else float("nan")
        re_ = r["predicted_kwh"] / r["measured_kwh"] if r["measured_kwh"] else float("nan")
        ok = abs(rt - 1) <= TARGET and abs(re_ - 1) <= TARGET
        ok_all &= ok
        r.update(time_ratio=rt, energy_ratio=re_, within_target=ok)
        print(
            f"{r['recipe']:<14}{r['predicted_s']:>9.1f}{r['measured_s']:>9.1f}{rt:>7.2f}"
            f"{r['predicted_kwh'] * 1000:>10.3f}{r['measured_kwh'] * 1000:>10.3f}{re_:>7.2f}  "
            f"{'yes' if ok else 'no'}"
        )
    print("\nmeasured by: " + "; ".join(sorted({r["measured_by"] for r in rows})))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
