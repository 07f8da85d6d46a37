"""python benchmarks/quant_memory_speed.py [--layers 10] [--steps 3] [--seq 128] [--threads N]
    [--compile auto|0|1] [--fp32-io]

Measures what a 4-bit frozen base buys for LoRA training on CPU: fp32-base LoRA vs
q4_k-base LoRA (QLoRA) on the same ≥ 500 M-parameter dense Llama (hidden 2048, 16 heads /
4 KV heads, intermediate 5632, vocab 32000, random weights, written once to a temp dir),
LoRA r16 / alpha 32 on attention + MLP, AdamW over the trainable parameters, batch 1 × 128.

For each variant, in its own fresh subprocess:
- baseline resident memory after imports (torch, transformers, greentune);
- peak resident memory above that baseline over load + LoRA + training steps
  (ru_maxrss, cross-checked by a 10 ms psutil sampling thread);
- step time: median of `--steps` steps after one warm-up step.

Loading uses greentune's own paths: `greentune.models.loader.load_model` for fp32 and
`greentune.quant.load_quantized(dir, "q4_k")` (meta skeleton, tensors streamed from
safetensors and quantised as they arrive) for q4_k. The q4_k base stores the token embedding
in Q4_K and lm_head in Q6_K, as llama.cpp's Q4_K_M does (`--fp32-io` keeps both fp32, the old
behaviour: 524 MB, a floor of ~0.28× on its own). `--compile` sets GREENTUNE_QUANT_COMPILE in
the children (auto/1: greentune's native C dequantise kernels, built once with the system
compiler and cached, see `greentune.quant.kernels`; 0: plain torch). Targets: memory ≤ 0.35×, step time ≤
1.25×. Both loaders (`load_model` and `load_quantized`) fix glibc's mmap threshold at 1 MB
(`greentune.heap.limit_heap_retention`), so both children return freed tensors to the OS
instead of growing a fragmented heap: the comparison is like for like.
The machine's load average is printed with the results: on a shared machine, step times
follow it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 2048, 16, 4, 5632, 32000
RANK, ALPHA = 16, 32


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_parts_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB from /proc/self/status; file-backed includes mmapped
    safetensors."""
    anon = file = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) / 1024
    return anon, file


class PeakSampler(threading.Thread):
    """Samples RSS (and its anonymous / file-backed parts) every 10 ms; `mark()` starts a new phase."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = False
        self.phases: dict[str, list[float]] = {}
        self.phase = "load"

    def mark(self, phase: str) -> None:
        self.phase = phase

    def run(self):
        while not self.stop:
            anon, file = rss_parts_mb()
            cur = self.phases.setdefault(self.phase, [0.0, 0.0, 0.0])
            cur[0], cur[1], cur[2] = max(cur[0], anon + file), max(cur[1], anon), max(cur[2], file)
            time.sleep(0.01)

    @property
    def peak(self) -> float:
        return max(v[0] for v in self.phases.values())


def child(variant: str, model_dir: str, steps: int, seq: int, threads: int, fp32_io: bool = False) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import transformers  # noqa: F401

    from greentune.adapters.lora import apply_lora
    from greentune.models.loader import load_model
    from greentune.quant import load_quantized

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, seq))
    import gc

    gc.collect()
    base_rss, base_max = rss_mb(), maxrss_mb()
    base_anon, base_file = rss_parts_mb()
    sampler = PeakSampler()
    sampler.start()

    t0 = time.perf_counter()
    skip = ("lm_head", "embed_tokens") if fp32_io else ()
    model = load_model(model_dir) if variant == "fp32" else load_quantized(model_dir, "q4_k", skip=skip)
    load_s = time.perf_counter() - t0
    after_load = rss_mb()
    load_maxrss = maxrss_mb()
    sampler.mark("train")
    apply_lora(model, ["attn", "mlp"], RANK, ALPHA)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t)
    sampler.stop = True
    sampler.join()
    print(
        json.dumps(
            {
                "variant": variant,
                "baseline_mb": base_rss,
                "baseline_maxrss_mb": base_max,
                "peak_maxrss_mb": maxrss_mb(),
                "peak_sampled_mb": sampler.peak,
                "after_load_mb": after_load,
                "load_maxrss_mb": load_maxrss,
                "load_s": load_s,
                "baseline_anon_mb": base_anon,
                "baseline_file_mb": base_file,
                "phases": sampler.phases,
                "step_s": statistics.median(times),
                "step_times": times,
                "trainable": sum(p.numel() for p in params),
                "loss": float(loss),
                "torch_threads": torch.get_num_threads(),
                "loadavg": os.getloadavg(),
            }
        )
    )


def build(out_dir: str, layers: int, seq: int) -> None:
    import torch

    from greentune.models.tiny import build_tiny_model

    model = build_tiny_model(
        "llama",
        out_dir,
        tokenizer=None,
        vocab_size=VOCAB,
        hidden=HIDDEN,
        layers=layers,
        heads=HEADS,
        kv_heads=KV_HEADS,
        intermediate=INTER,
        max_positions=512,
    )
    n = sum(p.numel() for p in model.parameters())
    n_lin = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    )
    print(
        f"model: llama, {layers} layers, hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}: "
        f"{n / 1e6:.1f} M parameters ({n_lin / 1e6:.1f} M in the layers' linears, "
        f"{(n - n_lin) / 1e6:.1f} M embeddings + lm_head); batch 1 x {seq}; "
        f"LoRA r{RANK} attn+mlp; {os.cpu_count()} CPUs",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads in the children (0: torch's default)"
    )
    ap.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "0", "1"],
        help="GREENTUNE_QUANT_COMPILE for the children (0: plain-torch dequantise, no native kernels)",
    )
    ap.add_argument(
        "--fp32-io", action="store_true", help="keep the q4_k base's embedding and lm_head in fp32"
    )
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.steps, args.seq, args.threads, args.fp32_io)
    if args.build:
        return build(args.build, args.layers, args.seq)

    with tempfile.TemporaryDirectory(prefix="gt-qbench-") as tmp:
        # Built in a subprocess: Linux carries ru_maxrss across fork+exec, so a parent that had held
        # the 2 GB model would put its own peak into every child's ru_maxrss.
        subprocess.run(
            [sys.executable, __file__, "--build", tmp, "--layers", str(args.layers), "--seq", str(args.seq)],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        res = {}
        env = dict(os.environ, GREENTUNE_QUANT_COMPILE=args.compile)
        for variant in ("fp32", "q4_k"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    tmp,
                    "--steps",
                    str(args.steps),
                    "--seq",
                    str(args.seq),
                    "--threads",
                    str(args.threads),
                ]
                + (["--fp32-io"] if args.fp32_io else []),
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[variant]
            print(
                f"  {variant}: baseline {r['baseline_mb']:.0f} MB (maxrss at start "
                f"{r['baseline_maxrss_mb']:.0f} MB), "
                f"load {r['load_s']:.1f} s, "
                f"steps {[round(t, 2) for t in r['step_times']]}, load average {r['loadavg'][0]:.2f}",
                flush=True,
            )

    f, q = res["fp32"], res["q4_k"]

    def above(r):
        return r["peak_maxrss_mb"] - r["baseline_mb"]

    def above_s(r):
        return r["peak_sampled_mb"] - r["baseline_mb"]

    print()
    print(f"| {'':29} | {'fp32 base':>10} | {'q4_k base':>10} | {'ratio':>6} | target |")
    print(f"|{'-' * 31}|{'-' * 12}|{'-' * 12}|{'-' * 8}|--------|")
    print(
        f"| {'baseline RSS after imports':29} | {f['baseline_mb']:7.0f} MB | {q['baseline_mb']:7.0f} MB | "
        f"{'':>6} |        |"
    )
    print(
        f"| {'peak above baseline (maxrss)':29} | {above(f):7.0f} MB | {above(q):7.0f} MB | "
        f"{above(q) / above(f):6.3f} | ≤ 0.35 |"
    )
    print(
        f"| {'peak above baseline (sampled)':29} | {above_s(f):7.0f} MB | {above_s(q):7.0f} MB | "
        f"{above_s(q) / above_s(f):6.3f} |        |"
    )
    print(
        f"| {'step time (median)':29} | {f['step_s']:8.2f} s | {q['step_s']:8.2f} s | "
        f"{q['step_s'] / f['step_s']:6.3f} | ≤ 1.25 |"
    )
    for phase in ("load", "train"):
        pf, pq = f["phases"][phase], q["phases"][phase]
        print(
            f"| {'sampled peak, ' + phase + ' phase':29} | {pf[0] - f['baseline_mb']:7.0f} MB | "
            f"{pq[0] - q['baseline_mb']:7.0f} MB | "
            f"{(pq[0] - q['baseline_mb']) / (pf[0] - f['baseline_mb']):6.3f} |        |"
        )
        print(
            f"|   {'of which anon / file-backed':27} | "
            f"{pf[1] - f['baseline_anon_mb']:4.0f}/{pf[2] - f['baseline_file_mb']:<5.0f} | "
            f"{pq[1] - q['baseline_anon_mb']:4.0f}/{pq[2] - q['baseline_file_mb']:<5.0f} |        |        |"
        )
    print(
        f"| {'maxrss at end of load':29} | {f['load_maxrss_mb'] - f['baseline_mb']:7.0f} MB | "
        f"{q['load_maxrss_mb'] - q['baseline_mb']:7.0f} MB |        |        |"
    )
    print(
        f"| {'load time':29} | {f['load_s']:8.1f} s | {q['load_s']:8.1f} s | "
        f"{q['load_s'] / f['load_s']:6.2f} |        |"
    )


if __name__ == "__main__":
    main()
