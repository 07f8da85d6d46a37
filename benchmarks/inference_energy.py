"""What the shipped model costs to run: the demo's models in llama.cpp, f16 / q8_0 / q4_k_m / q4_0.

    # after: greentune demo --out /tmp/gt-demo
    python benchmarks/inference_energy.py --demo /tmp/gt-demo
    python benchmarks/inference_energy.py --demo runs/demo --threads 1 --seconds 3

Part A, the demo's models (`greentune demo` output; the base from `demo.run.build_base`):

- dense base (the reused, pretrained model), the LoRA fine-tune (`lora/merged`);
- MoE, equal active parameters: the LoRA fine-tune upcycled to 4 experts, top-1
  (`greentune upcycle`; every expert a copy, so its outputs equal the dense model's and its
  active weights per token are the dense model's plus a 4 × H router per layer);
- MoE, demo: `moe/merged`, 4 experts top-2, trained (twice the dense MLP active per token).

Each in f16, q8_0, q4_k_m and q4_0 through greentune's exporter, then `greentune eval
--engine llamacpp` (greentune.inference.evaluate_inference): held-out perplexity from
llama.cpp's logits on the client's held-out code, prompt and generation tokens/s and J/token
under greentune's meter; the dense base also under the torch engine. Ratios are measured in
this one run against the named baseline: MoE vs dense at equal active parameters, 4-bit vs
16-bit.

Part B, the planner's serving model checked on this machine: a larger random-weight Llama
(hidden 768, 8 layers, 60 M parameters, ≥ 34 MB in any format, so decoding streams weights
from DRAM rather than the 32 MB L3), its 4-expert top-1 upcycle (equal active, 3× total) and a
dense model with the same *total* parameters (4× MLP width), measured in llama.cpp and
projected by `plan.inference.project` for "this" machine with its memory bandwidth measured
here (`measure_bandwidth`, same thread count). Predicted vs measured decode tokens/s is the
check (±30 %); prompt processing uses the planner's assumed utilisation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

FORMATS = ("f16", "q8_0", "q4_k_m", "q4_0")


def _params(model_dir: Path) -> tuple[int, int]:
    from greentune.models.facts import arch_facts, load_config_dict

    f = arch_facts(load_config_dict(model_dir))
    return f.total_params, f.active_params


def _export(model_dir: Path, out: Path, quant: str) -> Path:
    from greentune.export.gguf import export_gguf

    path = out / f"{model_dir.parent.name if model_dir.name == 'merged' else model_dir.name}-{quant}.gguf"
    if not path.exists():
        export_gguf(model_dir, path, quant)
    return path


def _eval(path: Path, data: Path, a, engine: str = "llamacpp", max_rows: int | None = None, **kw) -> dict:
    from greentune.inference import evaluate_inference

    return evaluate_inference(
        path,
        data,
        engine=engine,
        prompt_tokens=a.prompt_tokens,
        gen_tokens=a.gen_tokens,
        threads=a.threads,
        min_seconds=a.seconds,
        max_seq_len=128,
        max_rows=a.rows if max_rows is None else max_rows,
        record=False,
        **kw,
    )


def _row(name: str, fmt: str, r: dict, total: int, active: int) -> dict:
    return {
        "model": name,
        "format": fmt,
        "engine": r["engine"],
        "mb": r["model_bytes"] / 1e6,
        "total": total,
        "active": active,
        "ppl": r["perplexity"],
        "pp_tps": r["prompt"]["tokens_per_s"],
        "pp_j": r["prompt"]["j_per_token"],
        "tg_tps": r["generate"]["tokens_per_s"],
        "pp_cpu_tps": r["prompt"]["tokens_per_cpu_s"],
        "tg_cpu_tps": r["generate"]["tokens_per_cpu_s"],
        "tg_j": r["generate"]["j_per_token"],
        "estimate": r["estimate"],
        "peak_mb": r["peak_rss_bytes"] / 2**20,
    }


def _table(rows: list[dict]) -> str:
    out = [
        "| model | format | engine | file MB | params total / active | held-out ppl | prompt tok/s (per "
        "CPU-s; wall) "
        "| prompt mJ/tok | gen tok/s (per CPU-s; wall) | gen mJ/tok |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['format']} | {r['engine']} | {r['mb']:.2f} | "
            f"{r['total'] / 1e6:.2f} M / {r['active'] / 1e6:.2f} M | {r['ppl']:.2f} | "
            f"{r['pp_cpu_tps']:,.0f}; "
            f"{r['pp_tps']:,.0f} | {r['pp_j'] * 1e3:.3f} | {r['tg_cpu_tps']:,.0f}; {r['tg_tps']:,.0f} "
            f"| {r['tg_j'] * 1e3:.3f} |"
        )
    return "\n".join(out)


def part_a(a, out: Path, data: Path) -> list[dict]:
    from greentune.demo.run import build_base
    from greentune.moe import upcycle

    demo = Path(a.demo)
    steps = (
        json.loads((demo / "demo.json").read_text()).get("steps", 20) if (demo / "demo.json").exists() else 20
    )
    base = build_base(progress=False, steps=60 if steps <= 20 else 300)
    lora = demo / "lora" / "merged"
    top1 = out / "lora-moe-top1"
    if not (top1 / "config.json").exists():
        upcycle(lora, top1, experts=4, top_k=1, seed=0)
    models = [
        ("dense base", base),
        ("LoRA fine-tune (dense)", lora),
        ("MoE 4x top-1 of the LoRA model", top1),
        ("MoE 4x top-2, demo (trained)", demo / "moe" / "merged"),
    ]
    rows = []
    for name, model_dir in models:
        if not (model_dir / "config.json").exists():
            print(f"skipping {name}: no model at {model_dir}", file=sys.stderr)
            continue
        total, active = _params(model_dir)
        if name == "dense base":
            rows.append(_row(name, "fp32", _eval(model_dir, data, a, engine="torch"), total, active))
        for quant in FORMATS:
            r = _eval(_export(model_dir, out, quant), data, a)
            rows.append(_row(name, quant, r, total, active))
            print(
                f"  {name} {quant}: ppl {r['perplexity']:.2f}, gen {r['generate']['tokens_per_s']:,.0f} "
                "tok/s, "
                f"{r['generate']['j_per_token'] * 1e3:.3f} mJ/token",
                file=sys.stderr,
            )
    return rows


def _ratios(rows: list[dict]) -> list[str]:
    get = {(r["model"], r["format"]): r for r in rows}
    lines = []
    for fmt in FORMATS:
        d, m = get.get(("LoRA fine-tune (dense)", fmt)), get.get(("MoE 4x top-1 of the LoRA model", fmt))
        if d and m:
            lines.append(
                f"- MoE (4x top-1) / dense at equal active parameters, {fmt}: generation J/token "
                f"{m['tg_j'] / d['tg_j']:.2f}x, tokens per CPU-s {m['tg_cpu_tps'] / d['tg_cpu_tps']:.2f}x, "
                f"prompt J/token "
                f"{m['pp_j'] / d['pp_j']:.2f}x, perplexity {m['ppl'] / d['ppl']:.3f}x"
            )
    for name in sorted({r["model"] for r in rows}):
        f16, q4 = get.get((name, "f16")), get.get((name, "q4_0"))
        if f16 and q4:
            lines.append(
                f"- 4-bit (q4_0) / 16-bit (f16), {name}: generation J/token {q4['tg_j'] / f16['tg_j']:.2f}x, "
                f"tokens per CPU-s {q4['tg_cpu_tps'] / f16['tg_cpu_tps']:.2f}x, file "
                f"{q4['mb'] / f16['mb']:.2f}x, "
                f"perplexity {q4['ppl'] / f16['ppl']:.3f}x"
            )
    return lines


def part_b(a, out: Path, data: Path) -> tuple[list[dict], float]:
    """Predicted (plan.inference) vs measured (llama.cpp) on this machine, weights larger than the L3."""
    from greentune.demo import corpus
    from greentune.models import tiny
    from greentune.moe import upcycle
    from greentune.plan.hardware import detect_this
    from greentune.plan.inference import device_power_w, measure_bandwidth, profile_from_gguf, project

    texts = corpus.docstrings(limit_chars=300_000)
    tok = tiny.build_tokenizer(texts, out / "calib-tokenizer", vocab_size=2048)
    if not data.exists():
        data = out / "calib-eval.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-20:]))
    sizes = dict(hidden=768, layers=8, heads=12, kv_heads=4, max_positions=512)
    dense, wide, moe = out / "calib-dense", out / "calib-dense-4x-mlp", out / "calib-moe-top1"
    if not (dense / "config.json").exists():
        tiny.build_tiny_model("llama", dense, tokenizer=tok, intermediate=2048, **sizes)
    if not (wide / "config.json").exists():
        tiny.build_tiny_model("llama", wide, tokenizer=tok, intermediate=8192, **sizes)
    if not (moe / "config.json").exists():
        upcycle(dense, moe, experts=4, top_k=1, seed=0)
    import psutil

    this = detect_this()
    power = device_power_w(this, a.threads)
    cores = min(psutil.cpu_count(logical=False) or 1, len(psutil.Process().cpu_affinity() or [1]))
    peak = this.peak_flops * min(a.threads, cores) / cores  # the threads llama.cpp runs, not the whole CPU
    cases = [
        ("dense 60 M", dense, "f16"),
        ("dense 60 M", dense, "q8_0"),
        ("dense 60 M", dense, "q4_0"),
        ("MoE 4x top-1 (equal active, 3x total)", moe, "q8_0"),
        ("dense 4x MLP (equal total)", wide, "q8_0"),
    ]
    rows, bws = [], []
    for name, model_dir, quant in cases:
        path = _export(model_dir, out, quant)
        bw = measure_bandwidth(a.threads, clock="cpu")
        r = _eval(path, data, a, max_rows=1)
        bw = (
            bw + measure_bandwidth(a.threads, clock="cpu")
        ) / 2  # the bandwidth around this very measurement
        bws.append(bw)
        p = project(
            profile_from_gguf(path),
            this,
            a.prompt_tokens,
            a.gen_tokens,
            bandwidth_gbs=bw,
            power_w=power,
            peak_flops=peak,
        )
        total, active = _params(model_dir)
        tg, pp = r["generate"], r["prompt"]
        rows.append(
            {
                "model": name,
                "format": quant,
                "file": str(path),
                "mb": r["model_bytes"] / 1e6,
                "total": total,
                "active": active,
                "bw": bw,
                "pred_tg": p.decode_tokens_per_s,
                "meas_tg": tg["tokens_per_cpu_s"] * a.threads,
                "meas_tg_wall": tg["tokens_per_s"],
                "pred_tg_j": p.decode_j_per_token,
                "meas_tg_j": tg["j_per_token"],
                "pred_pp": p.prompt_tokens_per_s,
                "meas_pp": pp["tokens_per_cpu_s"] * a.threads,
                "meas_pp_wall": pp["tokens_per_s"],
                "l3_resident": r["model_bytes"] <= a.l3_mb * 2**20,
                "estimate": r["estimate"],
            }
        )
        print(
            f"  calib {name} {quant}: decode predicted {p.decode_tokens_per_s:.1f}, measured "
            f"{rows[-1]['meas_tg']:.1f} tok/s per CPU-second ({tg['tokens_per_s']:.1f} wall) at {bw:.1f} "
            "GB/s",
            file=sys.stderr,
        )
    _calibrate(rows, a, this, power, peak)
    return rows, power


def _calibrate(rows: list[dict], a, this, power: float, peak: float) -> None:
    """Per format, the first (dense) model's measured decode fixes this machine's weight-streaming rate
    (`effective_bandwidth_gbs`); the projection of every other model in that format uses it."""
    from greentune.plan.inference import effective_bandwidth_gbs, profile_from_gguf, project

    ref: dict[str, float] = {}
    for r in rows:
        prof = profile_from_gguf(r["file"])
        if r["format"] not in ref:
            ref[r["format"]] = effective_bandwidth_gbs(prof, r["meas_tg"], a.prompt_tokens, a.gen_tokens)
            r["calibrates"] = True
        r["eff_bw"] = ref[r["format"]]
        r["cal_tg"] = project(
            prof,
            this,
            a.prompt_tokens,
            a.gen_tokens,
            bandwidth_gbs=r["eff_bw"],
            power_w=power,
            peak_flops=peak,
        ).decode_tokens_per_s


def _calib_table(rows: list[dict]) -> str:
    out = [
        "| model | format | file MB | params total / active | probe GB/s | decode tok/s: raw prediction "
        "| calibrated prediction | measured (per CPU-s; wall) | raw / meas | calibrated / meas "
        "| decode mJ/tok predicted (raw) | measured | prompt tok/s predicted | measured (per CPU-s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        l3 = " (fits the L3)" if r["l3_resident"] else ""
        cal = f"calibrates ({r['eff_bw']:.1f} GB/s)" if r.get("calibrates") else f"{r['cal_tg']:.1f}"
        ratio = "—" if r.get("calibrates") else f"{r['cal_tg'] / r['meas_tg']:.2f}"
        out.append(
            f"| {r['model']} | {r['format']}{l3} | {r['mb']:.0f} | {r['total'] / 1e6:.0f} M / "
            f"{r['active'] / 1e6:.0f} M | {r['bw']:.1f} | {r['pred_tg']:.1f} | {cal} | {r['meas_tg']:.1f}; "
            f"{r['meas_tg_wall']:.1f} | {r['pred_tg'] / r['meas_tg']:.2f} | {ratio} | "
            f"{r['pred_tg_j'] * 1e3:.1f} "
            f"| {r['meas_tg_j'] * 1e3:.1f} | {r['pred_pp']:,.0f} | {r['meas_pp']:,.0f} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--demo", default="runs/demo", help="a `greentune demo --out` folder (lora/, moe/, data/eval.jsonl)"
    )
    ap.add_argument("--out", default="/tmp/greentune-inference-bench", help="exports and results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum metered seconds per phase")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=40, help="held-out rows of 128 tokens for the perplexity")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--l3-mb", type=float, default=32.0, help="this CPU's last-level cache, MiB (lscpu)")
    ap.add_argument("--calibration-only", action="store_true", help="part B only (no demo models needed)")
    a = ap.parse_args()
    from greentune.energy.hardware import describe_hardware

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.demo) / "data" / "eval.jsonl"
    hw = describe_hardware()
    label = (
        f"{hw['cpu']}, {hw['usable_cpus']} usable CPUs, llama.cpp (xllamacpp) {a.threads} thread(s); "
        f"loaded (other jobs on the 2 cores); {dt.date.today().isoformat()}"
    )
    t0 = time.time()
    rows = [] if a.calibration_only else part_a(a, out, data)
    text = ["", _table(rows), "", *_ratios(rows)] if rows else []
    calib = []
    if not a.skip_calibration:
        calib, power = part_b(a, out, data)
        text += [
            "",
            f"Planner check (plan.inference, 'this' machine at the bandwidth measured beside each run, "
            f"{power:.2f} W for {a.threads} thread(s)):",
            "",
            _calib_table(calib),
        ]
    est = any(r["estimate"] for r in rows + calib)
    text.insert(
        0,
        f"Machine: {label}. Energy: "
        f"{'estimate (no energy counter: CPU time × W/thread + RSS × W/GiB)' if est else 'measured'}.",
    )
    text.append(f"\n({time.time() - t0:.0f} s)")
    print("\n".join(text))
    (out / "results.json").write_text(
        json.dumps({"machine": label, "rows": rows, "calibration": calib}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
