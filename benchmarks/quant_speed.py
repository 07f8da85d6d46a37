"""Quantiser speed: `greentune export --quant q4_k_m` against llama.cpp's own quantiser, per thread.

    python benchmarks/quant_speed.py --llama-python /tmp/qbench-venv/bin/python
    python benchmarks/quant_speed.py --llama-python ... --rounds 1 --ppl-steps 20   # smoke run
    python benchmarks/quant_speed.py --llama-python ... --threads --ppl-steps 40    # quality only

llama.cpp's quantiser is `llama_cpp.llama_model_quantize` from llama-cpp-python, which compiles
llama.cpp at install (~15 min on 2 cores) and is no dependency of greentune: install it into a
separate venv (``python3 -m venv /tmp/qbench-venv; /tmp/qbench-venv/bin/pip install torch==2.13.0
llama-cpp-python``) and pass its interpreter as ``--llama-python``.

1. Speed, on a ~107 M-parameter Llama with random weights (hidden 1024, 8 layers, ff 2816,
   16 heads / 4 KV heads, vocab 8192: every row a multiple of 256), written locally as fp32
   safetensors. greentune exports it to GGUF f16 once (llama.cpp's input). Then, alternating for
   `--rounds` rounds, each on `--threads` threads:
   - greentune: the whole CLI, ``python -m greentune export MODEL --format gguf --quant q4_k_m``
     (interpreter start-up, imports, reading the checkpoint, quantising, writing), wall time;
     and `export_gguf` alone inside an already started interpreter;
   - llama.cpp: `llama_model_quantize(f16.gguf, Q4_K_M)` with ``nthread`` = threads, the call
     alone (its interpreter start-up and import are not counted).
   Weights/s per thread = parameters / wall seconds / threads, and parameters per CPU second
   (user + system, all threads: on a shared machine the fairer of the two); the ratio is
   greentune's over llama.cpp's, best round against best round, both measured in one job.
2. Quality (`--ppl-steps` > 0): `export_quality.py`'s small Llama trained briefly, exported by
   greentune to f16 and q4_k_m, its f16 GGUF quantised by llama.cpp to Q4_K_M, and all three
   evaluated by llama.cpp (xllamacpp) on held-out text: perplexity increase over f16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA_QUANTIZE = r"""
import sys, time, llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.nthread = nthread
t, c = time.perf_counter(), time.process_time()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
print("QUANTIZE_S", time.perf_counter() - t, time.process_time() - c, rc, flush=True)
"""

GT_EXPORT = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from greentune.export import export_gguf
t, c = time.perf_counter(), time.process_time()
export_gguf(sys.argv[1], sys.argv[2], "q4_k_m")
print("EXPORT_S", time.perf_counter() - t, time.process_time() - c, flush=True)
"""


def build_model(out: Path) -> int:
    """The speed model (random weights); returns its parameter count."""
    from greentune.demo import corpus
    from greentune.models import tiny

    texts = corpus.docstrings(limit_chars=2_000_000, part=None)
    tok = tiny.build_tokenizer(texts, out / "tok", vocab_size=8192)
    model = tiny.build_tiny_model(
        "llama",
        out / "model",
        tokenizer=tok,
        hidden=1024,
        layers=8,
        heads=16,
        kv_heads=4,
        intermediate=2816,
        max_positions=512,
    )
    return sum(p.numel() for p in model.parameters())


def _env(threads: int) -> dict:
    src = str(HERE.parent / "src")
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], env: dict, key: str | None) -> dict:
    """Wall and CPU seconds of the whole process, and the wall and CPU seconds it printed after
    `key` (its timed part alone)."""
    t, c = time.perf_counter(), _cpu_children()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out = {"wall": time.perf_counter() - t, "cpu": _cpu_children() - c}
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{r.stderr[-2000:]}")
    if key is not None:
        parts = next(ln for ln in r.stdout.splitlines() if ln.startswith(key)).split()
        if key == "QUANTIZE_S" and parts[3] != "0":
            raise RuntimeError(f"llama_model_quantize returned {parts[3]}")
        out.update(part_wall=float(parts[1]), part_cpu=float(parts[2]))
    return out


def speed(work: Path, llama_python: str, threads: int, rounds: int) -> dict:
    from greentune.export import export_gguf

    n_params = build_model(work)
    model = work / "model"
    f16 = export_gguf(model, work / "f16.gguf", "f16").path
    env = _env(threads)
    runs: dict[str, list[dict]] = {"greentune_cli": [], "greentune_export": [], "llamacpp": []}
    for r in range(rounds):
        runs["greentune_cli"].append(
            _run(
                [
                    sys.executable,
                    "-m",
                    "greentune",
                    "export",
                    str(model),
                    "--format",
                    "gguf",
                    "--quant",
                    "q4_k_m",
                    "--out",
                    str(work / "cli"),
                ],
                env,
                None,
            )
        )
        runs["greentune_export"].append(
            _run(
                [sys.executable, "-c", GT_EXPORT, str(model), str(work / "gt-q4_k_m.gguf"), str(threads)],
                env,
                "EXPORT_S",
            )
        )
        runs["llamacpp"].append(
            _run(
                [
                    llama_python,
                    "-c",
                    LLAMA_QUANTIZE,
                    str(f16),
                    str(work / "lc-q4_k_m.gguf"),
                    "Q4_K_M",
                    str(threads),
                ],
                env,
                "QUANTIZE_S",
            )
        )
        g, e, c = (runs[k][-1] for k in ("greentune_cli", "greentune_export", "llamacpp"))
        print(
            f"round {r}: greentune CLI {g['wall']:.2f} s ({g['cpu']:.2f} s CPU), export_gguf alone "
            f"{e['part_wall']:.2f} s ({e['part_cpu']:.2f}); llama_model_quantize {c['part_wall']:.2f} s "
            f"({c['part_cpu']:.2f})",
            flush=True,
        )

    def best(key: str, field: str) -> float:
        return min(r[field] for r in runs[key])

    # greentune: the whole CLI process; llama.cpp: the quantise call alone (its start-up not counted)
    secs = {
        "wall": {
            "greentune_cli": best("greentune_cli", "wall"),
            "greentune_export": best("greentune_export", "part_wall"),
            "llamacpp": best("llamacpp", "part_wall"),
        },
        "cpu": {
            "greentune_cli": best("greentune_cli", "cpu"),
            "greentune_export": best("greentune_export", "part_cpu"),
            "llamacpp": best("llamacpp", "part_cpu"),
        },
    }
    # CPU seconds already add up the threads: weights per CPU-second is per thread as it is
    per_thread = {
        clock: {k: n_params / v / (threads if clock == "wall" else 1) for k, v in d.items()}
        for clock, d in secs.items()
    }
    ratios = {
        clock: {k: d["llamacpp"] / d[k] for k in ("greentune_cli", "greentune_export")}
        for clock, d in secs.items()
    }
    return {
        "params": n_params,
        "threads": threads,
        "rounds": runs,
        "best_s": secs,
        "weights_per_s_per_thread": per_thread,
        "ratio_vs_llamacpp": ratios,
    }


def quality(work: Path, llama_python: str, steps: int, eval_tokens: int, ctx: int) -> dict:
    from export_quality import gguf_stats, held_out_windows, ppl_llamacpp, train_model
    from greentune.export import export_gguf

    model_dir, tok, held = train_model(work, steps, seq=128, batch=8)
    windows = held_out_windows(tok, held, eval_tokens, ctx)
    f16 = export_gguf(model_dir, work / "f16.gguf", "f16").path
    gt = export_gguf(model_dir, work / "gt-q4_k_m.gguf", "q4_k_m").path
    _run(
        [llama_python, "-c", LLAMA_QUANTIZE, str(f16), str(work / "lc-q4_k_m.gguf"), "Q4_K_M", "2"],
        _env(2),
        "QUANTIZE_S",
    )
    rows = {}
    for label, path in (
        ("f16", f16),
        ("greentune q4_k_m", gt),
        ("llama.cpp Q4_K_M", work / "lc-q4_k_m.gguf"),
    ):
        rows[label] = {"ppl": ppl_llamacpp(path, windows, ctx), "bits_per_weight": gguf_stats(path)[0]}
        print(
            f"{label:18s} ppl {rows[label]['ppl']:.4f}  {rows[label]['bits_per_weight']:.2f} bpw", flush=True
        )
    base = rows["f16"]["ppl"]
    for r in rows.values():
        r["delta_vs_f16"] = r["ppl"] - base
    return {"steps": steps, "eval_tokens": sum(len(w) - 1 for w in windows), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    ap.add_argument("--threads", type=int, nargs="*", default=[1], help="thread counts to time (none: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppl-steps", type=int, default=150, help="0: skip the perplexity part")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    work = args.out or Path(tempfile.mkdtemp(prefix="gt-quant-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "speed": []}
    for threads in args.threads:
        (work / f"speed-{threads}").mkdir(exist_ok=True)
        s = speed(work / f"speed-{threads}", args.llama_python, threads, args.rounds)
        result["speed"].append(s)
        for clock in ("wall", "cpu"):
            w, q = s["weights_per_s_per_thread"][clock], s["ratio_vs_llamacpp"][clock]
            print(
                f"{threads} thread(s), {s['params'] / 1e6:.1f} M params, {clock} clock: weights/s per "
                "thread: "
                f"greentune CLI {w['greentune_cli'] / 1e6:.2f} M, export_gguf "
                f"{w['greentune_export'] / 1e6:.2f} M, "
                f"llama.cpp {w['llamacpp'] / 1e6:.2f} M -> greentune/llama.cpp {q['greentune_cli']:.2f}x "
                "(CLI), "
                f"{q['greentune_export']:.2f}x (export_gguf)",
                flush=True,
            )
    if args.ppl_steps > 0:
        (work / "quality").mkdir(exist_ok=True)
        result["quality"] = quality(
            work / "quality", args.llama_python, args.ppl_steps, args.eval_tokens, args.ctx
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
