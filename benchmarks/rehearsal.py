"""Rehearsal of the headline job at Mixtral 8x7B's own layer shapes, through the product's commands.

    python benchmarks/rehearsal.py --data-dir /work/rh                 # 10 layers (~14.8 B, ~30 GB bf16)
    python benchmarks/rehearsal.py --data-dir /work/rh --layers 2      # the same shapes, 2 layers
    python benchmarks/rehearsal.py --data-dir /work/rh --only-checkpoint   # write the checkpoint, stop

1. A Mixtral-shaped checkpoint with random weights: hidden 4096, intermediate 14336, 8 experts
   top-2, 32 heads / 8 KV heads, vocab 32000, rope theta 1e6, `--layers` decoder layers, written
   in HF's own Mixtral layout (``block_sparse_moe.experts.E.w1/w2/w3``) as bf16 safetensors, one
   shard per decoder layer plus one for the embedding, final norm and head, with an index; no
   more than one shard is ever in memory. A byte-level BPE tokenizer of vocab 32000 is trained
   locally. A marker (`rehearsal.json`: a hash of the shapes, seed and tokenizer) lets a rerun
   reuse the checkpoint; `--force` writes it again.
2. Through the CLI (`python -m greentune ...` in a subprocess, the path users take), one phase at
   a time:
   - ``plan RECIPE --json``: the planner's memory and time for this machine;
   - ``train RECIPE``: ``quant_base: q4_k``, LoRA r16 on attention and experts, seq 512, batch 1,
     activation checkpointing on, `--steps` steps and one ReLoRA merge;
   - ``export RUN_DIR --format gguf --quant q4_k_m``: from the training bytes (no second quantisation);
   - llama.cpp (xllamacpp) loads the GGUF and generates a few tokens.
   Each phase: wall time, peak RSS of its process tree (psutil, polled every 0.2 s, summed over
   the tree) and energy (train: the run's ledger, per sub-phase; export and llama.cpp: `greentune
   meter`, which meters a command the same way). The planner's predicted peak memory and training
   time are put beside the measured ones (time: the ledger's train phase, the steps the planner
   models).
3. Prints a markdown table and writes `rehearsal.json` in `--data-dir`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
GiB = 1024**3

SHAPES = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    rope_theta=1e6,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
)
VERSION = 2  # of the checkpoint writer: a change makes old checkpoints stale


# ---- the checkpoint ------------------------------------------------------------------------


def _marker(layers: int, seed: int) -> dict:
    spec = {"version": VERSION, "layers": layers, "seed": seed, **SHAPES}
    return {**spec, "hash": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}


def _layer_tensors(i: int):
    """(name, shape) of decoder layer `i` in HF's Mixtral layout."""
    h, inter, e = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["num_local_experts"]
    hd = h // SHAPES["num_attention_heads"]
    kv = SHAPES["num_key_value_heads"] * hd
    p = f"model.layers.{i}"
    yield f"{p}.input_layernorm.weight", (h,), "ones"
    yield f"{p}.post_attention_layernorm.weight", (h,), "ones"
    yield f"{p}.self_attn.q_proj.weight", (h, h), "randn"
    yield f"{p}.self_attn.k_proj.weight", (kv, h), "randn"
    yield f"{p}.self_attn.v_proj.weight", (kv, h), "randn"
    yield f"{p}.self_attn.o_proj.weight", (h, h), "randn"
    yield f"{p}.block_sparse_moe.gate.weight", (e, h), "randn"
    for x in range(e):
        q = f"{p}.block_sparse_moe.experts.{x}"
        yield f"{q}.w1.weight", (inter, h), "randn"
        yield f"{q}.w2.weight", (h, inter), "randn"
        yield f"{q}.w3.weight", (inter, h), "randn"


POOL = 1 << 26  # normal values drawn once; every weight tensor is cut from it at random offsets


def _pool(gen, std: float):
    import torch

    t = torch.empty(POOL + (1 << 20), dtype=torch.float32)
    t.normal_(0.0, std, generator=gen)
    return t.to(torch.bfloat16)


def _fill(t, pool, gen) -> None:
    """`t` (bf16) from `pool` in 1 M-value pieces at seeded random offsets: N(0, std) values, not
    independent across pieces (irrelevant to what is measured), at disk speed, not at the ~10 M
    values/s per core of drawing normals, so a 30 GB checkpoint takes minutes."""
    import torch

    flat = t.view(-1)
    piece = 1 << 20
    starts = torch.randint(0, POOL, ((flat.numel() + piece - 1) // piece,), generator=gen).tolist()
    for i, s in enumerate(starts):
        n = min(piece, flat.numel() - i * piece)
        flat[i * piece : i * piece + n].copy_(pool[s : s + n])


def _write_shard(path: Path, specs, gen, pool) -> dict:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, shape, kind in specs:
        if kind == "ones":
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            _fill(t, pool, gen)
            tensors[name] = t
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return {n: tuple(t.shape) for n, t in tensors.items()}


def build_checkpoint(model_dir: Path, layers: int, seed: int, force: bool) -> dict:
    """Write (or reuse) the checkpoint; returns its marker."""
    import torch
    from transformers import MixtralConfig

    marker = _marker(layers, seed)
    mfile = model_dir / "rehearsal.json"
    if not force and mfile.is_file() and json.loads(mfile.read_text()) == marker:
        print(f"reusing the checkpoint at {model_dir} ({marker['hash']})", flush=True)
        return marker
    model_dir.mkdir(parents=True, exist_ok=True)
    mfile.unlink(missing_ok=True)
    for old in model_dir.glob("*.safetensors"):
        old.unlink()
    tok = build_tokenizer(model_dir)
    config = MixtralConfig(
        **SHAPES,
        num_hidden_layers=layers,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    config.save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    pool = _pool(gen, 0.02)
    h, v = SHAPES["hidden_size"], SHAPES["vocab_size"]
    n = layers + 1
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < layers:
            specs = list(_layer_tensors(i))
        else:
            specs = [
                ("model.embed_tokens.weight", (v, h), "randn"),
                ("model.norm.weight", (h,), "ones"),
                ("lm_head.weight", (v, h), "randn"),
            ]
        shapes = _write_shard(model_dir / name, specs, gen, pool)
        for k, s in shapes.items():
            weight_map[k] = name
            total += 2 * int(torch.Size(s).numel())
        print(
            f"  shard {i + 1}/{n} written ({total / 1e9:.1f} GB so far, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    mfile.write_text(json.dumps(marker))
    return marker


def build_tokenizer(model_dir: Path):
    from greentune.demo import corpus
    from greentune.models import tiny

    if (model_dir / "tokenizer.json").is_file():  # deterministic: the same texts, the same merges
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if len(tok) == SHAPES["vocab_size"]:
            return tok

    # docstrings alone give ~23.5 k merges; the stdlib's source code gives the rest
    texts = corpus.docstrings(limit_chars=12_000_000, part=None) + corpus.source_snippets(20_000_000)
    tok = tiny.build_tokenizer(texts, model_dir, vocab_size=SHAPES["vocab_size"])
    if len(tok) != SHAPES["vocab_size"]:
        raise SystemExit(f"the tokenizer came out with {len(tok)} tokens, not {SHAPES['vocab_size']}")
    return tok


def write_data(work: Path, rows_train: int, rows_eval: int) -> tuple[Path, Path]:
    """Plain text enough for `rows_train` / `rows_eval` packed rows of 512 tokens (and then some)."""
    from greentune.demo import corpus

    texts = corpus.docstrings(limit_chars=400_000, part=None)
    half = len(texts) // 2
    train, held = work / "train.txt", work / "eval.txt"
    train.write_text("\n\n".join(texts[:half]))
    # eval: about rows_eval rows (≈ 3 characters per token)
    held.write_text("\n\n".join(texts[half:])[: rows_eval * 512 * 3])
    return train, held


def write_recipe(
    work: Path,
    model_dir: Path,
    train: Path,
    held: Path,
    steps: int,
    merge_every: int,
    no_savings: bool = False,
) -> Path:
    import yaml

    recipe = {
        "base_model": str(model_dir),
        "name": "rehearsal",
        "data": {"train": str(train), "eval": str(held), "max_seq_len": 512},
        "method": {
            "quant_base": "q4_k",
            "lora": {"rank": 16, "alpha": 32, "targets": ["attn", "experts"]},
            "relora": {"merge_every": merge_every, "restart_warmup": 0},
        },
        "train": {
            "steps": steps,
            "batch_size": 1,
            "warmup": 0,
            "checkpoint_every": 1000,
            "keep_checkpoints": 1,
            "activation_checkpointing": True,
        },
    }
    if no_savings:  # the source is deleted once quantised; the savings step re-checks it
        recipe["energy"] = {"measure_savings": False}
    path = work / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---- measuring a phase ---------------------------------------------------------------------


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, polled; keeps the timeline
    (wall-clock time, bytes) so the peak inside each ledger phase's window can be read off."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.timeline: list[tuple[float, int]] = []
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                self.timeline.append((time.time(), total))
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak

    def peak_between(self, start: float, end: float) -> int:
        return max((b for t, b in self.timeline if start <= t <= end), default=0)


CACHE: Path | None = None  # GREENTUNE_CACHE of every command (set in main)


def _env() -> dict:
    return {
        **os.environ,
        **({"GREENTUNE_CACHE": str(CACHE)} if CACHE else {}),
        "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
    }


def drop_source_after_quantise(run_dir: Path, model_dir: Path) -> threading.Thread:
    """Delete the checkpoint's shards once the train command's ledger shows its quantise phase done
    (nothing reads them after it: the savings counterfactual of a model this size is modelled from
    the config). For a disk that cannot hold the source beside the run's own copies."""

    def watch():
        ledger = run_dir / "ledger.jsonl"
        while True:
            if ledger.is_file() and '"phase": "quantise"' in ledger.read_text():
                (model_dir / "rehearsal.json").unlink(missing_ok=True)  # a rerun writes it again
                for p in model_dir.glob("*.safetensors"):
                    p.unlink()
                print(f"\n[rehearsal] quantised: deleted the source shards in {model_dir}", flush=True)
                return
            time.sleep(2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def run_phase(name: str, cmd: list[str], log: Path, capture: bool = False) -> dict:
    """Run `cmd`, passing its output (progress bars included) to `log` and the console as it
    comes; wall time, peak tree RSS and the RSS timeline."""
    print(f"\n== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    started = time.time()
    chunks = []
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        rss = TreeRSS(p.pid)
        while True:
            chunk = p.stdout.read1(65536)
            if not chunk:
                break
            f.write(chunk)
            f.flush()
            chunks.append(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        rc = p.wait()
    wall = time.perf_counter() - t0
    peak = rss.stop()
    print(f"\n== {name}: rc {rc}, {wall:.1f} s, peak RSS {peak / GiB:.2f} GiB", flush=True)
    out = b"".join(chunks).decode("utf-8", "replace")
    res = {"phase": name, "rc": rc, "wall_s": wall, "peak_rss_gib": peak / GiB, "start": started}
    res["_rss"] = rss
    if capture:
        res["stdout"] = out
    if rc != 0:
        res["error"] = out[-3000:]
    return res


def _metered(cmd: list[str]) -> list[str]:
    """`cmd` under `greentune meter --json` (energy of that command, on stderr as one JSON line)."""
    return [sys.executable, "-m", "greentune", "meter", "--json", "--", *cmd]


def _meter_joules(text: str) -> float | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and "joules" in line:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            j = d.get("joules")
            return sum(j.values()) if isinstance(j, dict) else j
    return None


def ledger_phases(run_dir: Path, rss: TreeRSS | None) -> list[dict]:
    """The run's ledger rows merged per consecutive phase (the train phase's interval rows are
    one), each with its seconds, joules, source and the peak tree RSS inside its window."""
    path = run_dir / "ledger.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []
    out: list[dict] = []
    for r in rows:
        if out and out[-1]["phase"] == r["phase"] and r["phase"] == "train":
            d = out[-1]
        else:
            d = {"phase": r["phase"], "seconds": 0.0, "joules": 0.0, "source": set(), "start": r["start"]}
            out.append(d)
        d["seconds"] += r.get("seconds") or 0.0
        d["joules"] += sum(r["joules"].values())
        d["source"].update(r.get("source", {}).values())
        d["end"] = r["end"]
    for d in out:
        d["source"] = "+".join(sorted(d["source"]))
        if rss is not None:
            d["peak_rss_gib"] = rss.peak_between(d["start"], d["end"]) / GiB
    return out


def planner_prediction(plan_stdout: str) -> dict:
    """The planner's estimate for the recipe's own technique (`plan RECIPE --json`'s first row)."""
    data = json.loads(plan_stdout[plan_stdout.index("{") :])
    e = data["estimates"][0]
    return {
        "technique": e["technique"]["name"],
        "memory_gb": e["memory_bytes"] / 1e9,
        "memory": {k: v / 1e9 for k, v in e["memory"].items()},
        "checkpointing": e["checkpointing"],
        "train_seconds": e["seconds"],
        "compute_seconds": e["compute_seconds"],
        "dequant_seconds": e["dequant_seconds"],
        "it_kwh": e["it_kwh"],
        "hardware": data["hardware"]["name"],
        "calibrated": bool(data.get("calibrated")) or "calibrat" in json.dumps(data["hardware"]),
    }


def table(report: dict) -> str:
    """The markdown table: one row per phase (the train command's ledger phases indented), the
    planner's memory and time (its own model, and after `plan --calibrate`) beside the measured."""
    res = report["results"]
    model = res.get("plan", {}).get("plan")
    cal = res.get("plan_calibrated", {}).get("plan")
    lines = [
        "| phase | wall | peak RSS | energy (ledger / meter) | planner: model | planner: calibrated "
        "| planner vs measured |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def j(x):
        return f"{x / 3600:.3f} Wh" if x is not None else "n/a"

    def row(label, wall, rss, joules, pm="", pc="", meas=""):
        lines.append(f"| {label} | {wall:.1f} s | {rss:.2f} GiB | {j(joules)} | {pm} | {pc} | {meas} |")

    for key, label in (("plan", "`greentune plan`"), ("calibrate", "`greentune plan --calibrate`")):
        if key in res:
            row(label, res[key]["wall_s"], res[key]["peak_rss_gib"], None)
    if "plan_calibrated" in res:
        row(
            "`greentune plan` (calibrated)",
            res["plan_calibrated"]["wall_s"],
            res["plan_calibrated"]["peak_rss_gib"],
            None,
        )
    if "train" in res:
        r = res["train"]
        total = sum(d["joules"] for d in r["ledger"])
        mem = [p["memory_gb"] * 1e9 / GiB if p else None for p in (model, cal)]
        meas = " / ".join(_pct(r["peak_rss_gib"], m) for m in mem if m)
        row(
            "`greentune train` (whole command): peak memory",
            r["wall_s"],
            r["peak_rss_gib"],
            total,
            f"{mem[0]:.2f} GiB" if mem[0] else "",
            f"{mem[1]:.2f} GiB" if mem[1] else "",
            meas,
        )
        merges = 0
        steps_s = sum(d["seconds"] for d in r["ledger"] if d["phase"] == "train")
        for d in r["ledger"]:
            name = d["phase"]
            if name == "merge":
                merges += 1
                name = "merge (ReLoRA, in training)" if merges == 1 else "merge (final, writes merged/)"
            row(f"&nbsp;&nbsp;{name}", d["seconds"], d.get("peak_rss_gib", 0.0), d["joules"])
        relora = next((d["seconds"] for d in r["ledger"] if d["phase"] == "merge"), 0.0)
        t = [p["train_seconds"] if p else None for p in (model, cal)]
        train_rss = max((d.get("peak_rss_gib", 0.0) for d in r["ledger"] if d["phase"] == "train"), default=0)
        lines.append(
            f"| **training time** (steps + ReLoRA merge) | {steps_s + relora:.1f} s | {train_rss:.2f} GiB "
            "| | "
            + " | ".join(f"{x:.0f} s" if x else "" for x in t)
            + " | "
            + " / ".join(_pct(steps_s + relora, x) for x in t if x)
            + " |"
        )
    for key, label in (
        ("export", "`greentune export` (GGUF q4_k_m)"),
        ("llamacpp", "llama.cpp load + generate"),
    ):
        if key in res:
            r = res[key]
            row(label, r["wall_s"], r["peak_rss_gib"], r.get("joules"))
    ram = report.get("machine", {}).get("ram_gib")
    peak = max((r.get("peak_rss_gib", 0.0) for r in res.values()), default=0.0)
    if ram:
        lines.append("")
        lines.append(
            f"Peak RSS of any phase {peak:.2f} GiB = {100 * peak / ram:.0f} % of the {ram:.1f} GiB RAM "
            f"(target ≤ 80 %); checkpoint {report['checkpoint']['bytes'] / 1e9:.1f} GB of bf16 "
            f"({report['checkpoint']['bytes'] / GiB / ram:.2f}× the RAM)."
        )
    gen = res.get("llamacpp", {}).get("generated")
    if gen:
        lines.append(f"llama.cpp: `{gen}`")
    src = {d.get("source") for d in res.get("train", {}).get("ledger", [])}
    if src:
        lines.append(f"Energy source: {', '.join(sorted(x for x in src if x))}.")
    return "\n".join(lines)


def _pct(measured: float, predicted: float) -> str:
    if not predicted:
        return "n/a"
    return f"{100 * (predicted - measured) / measured:+.0f} %"


# ---- the rehearsal -------------------------------------------------------------------------


def load_line() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="checkpoint, run dir, GGUF, results")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--merge-every", type=int, default=2, help="ReLoRA merge after this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write the checkpoint again even if it matches")
    ap.add_argument("--only-checkpoint", action="store_true")
    ap.add_argument(
        "--drop-source",
        action="store_true",
        help="delete the checkpoint once quantised (for a disk that cannot hold it beside the run; "
        "turns the savings step off)",
    )
    ap.add_argument("--skip", default="", help="comma-separated phases to skip (plan,train,export,llamacpp)")
    ap.add_argument(
        "--table-from", type=Path, default=None, help="print the table of a results JSON, run nothing"
    )
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())))
        return 0
    sys.path.insert(0, str(SRC))

    data_dir = args.data_dir.resolve()
    global CACHE
    CACHE = data_dir / "cache"  # kernels compiled once for all reruns; calibrations of its own
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir = data_dir / f"mixtral-shaped-{args.layers}L"
    work = data_dir / f"work-{args.layers}L"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    marker = build_checkpoint(model_dir, args.layers, args.seed, args.force)
    ckpt_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"checkpoint: {ckpt_bytes / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.only_checkpoint:
        return 0

    import psutil

    ram = psutil.virtual_memory().total
    train_txt, eval_txt = write_data(work, args.steps, 2)
    recipe = write_recipe(
        work, model_dir, train_txt, eval_txt, args.steps, args.merge_every, args.drop_source
    )
    run_dir = work / "run"
    gguf = work / "model-q4_k_m.gguf"
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = load_line()
    results: dict[str, dict] = {}

    if "plan" not in skip:
        # the planner's own model first (no calibration of this machine in the rehearsal's cache),
        # then after `plan --calibrate` (what a user who calibrated gets)
        (CACHE / "calibration.json").unlink(missing_ok=True)
        plan_cmd = [py, "-m", "greentune", "plan", str(recipe), "--json"]
        r = run_phase("plan", plan_cmd, work / "plan.log", True)
        if r["rc"] == 0:
            r["plan"] = planner_prediction(r.pop("stdout"))
        results["plan"] = r
        if "calibrate" not in skip:
            cal = [py, "-m", "greentune", "plan", "--calibrate"]
            results["calibrate"] = run_phase("calibrate", cal, work / "calibrate.log")
            r = run_phase("plan (calibrated)", plan_cmd, work / "plan-calibrated.log", True)
            if r["rc"] == 0:
                r["plan"] = planner_prediction(r.pop("stdout"))
            results["plan_calibrated"] = r
    if "train" not in skip:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        free = shutil.disk_usage(data_dir).free
        need = int(ckpt_bytes * (1.0 + 0.30 * 2 + 0.30) * 1.05)  # merged/ + training bytes + checkpoint
        if args.drop_source:
            drop_source_after_quantise(run_dir, model_dir)
        elif free < need:
            print(
                f"warning: free disk {free / 1e9:.1f} GB < the run's {need / 1e9:.1f} GB; --drop-source "
                "deletes "
                "the source once quantised (and turns the savings step off: it re-checks the base folder)"
            )
        results["train"] = run_phase(
            "train",
            [py, "-m", "greentune", "train", str(recipe), "--run-dir", str(run_dir)],
            work / "train.log",
        )
        results["train"]["ledger"] = ledger_phases(run_dir, results["train"]["_rss"])
    if results.get("train", {}).get("rc", 0) != 0:
        skip |= {"export", "llamacpp"}
    if "export" not in skip:
        gguf.unlink(missing_ok=True)
        if shutil.disk_usage(data_dir).free < 1.2 * ckpt_bytes * 0.3:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            print("free disk short of the GGUF: deleted the run's resume checkpoint")
        r = run_phase(
            "export",
            _metered(
                [py, "-m", "greentune", "export", str(run_dir), "--format", "gguf", "--quant", "q4_k_m"]
                + ["--out", str(gguf)]
            ),
            work / "export.log",
            True,
        )
        r["joules"] = _meter_joules(r.pop("stdout"))
        results["export"] = r
    if results.get("export", {}).get("rc", 0) != 0:
        skip.add("llamacpp")
    if "llamacpp" not in skip:
        code = (
            "import sys; from greentune.export import llamacpp; "
            "o = llamacpp.generate(sys.argv[1], 'def main', max_tokens=8); "
            "print('GENERATED', repr(o.text), o.tokens_per_second)"
        )
        r = run_phase("llamacpp", _metered([py, "-c", code, str(gguf)]), work / "llamacpp.log", True)
        out = r.pop("stdout")
        r["joules"] = _meter_joules(out)
        r["generated"] = next((ln for ln in out.splitlines() if ln.startswith("GENERATED")), None)
        results["llamacpp"] = r

    for r in results.values():
        r.pop("_rss", None)
    report = {
        "date": started,
        "layers": args.layers,
        "steps": args.steps,
        "merge_every": args.merge_every,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "ram_gib": ram / GiB,
            "python": platform.python_version(),
        },
        "load_before": load_before,
        "load_after": load_line(),
        "checkpoint": {"dir": str(model_dir), "bytes": ckpt_bytes, **marker},
        "results": results,
    }
    out = data_dir / f"rehearsal-{args.layers}L.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    md = table(report)
    (data_dir / f"rehearsal-{args.layers}L.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\n{report['load_before']} before, {report['load_after']} after; wrote {out}")
    return 0 if all(r.get("rc") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
