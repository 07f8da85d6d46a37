"""Calibrate the planner on this machine: a short measured LoRA fine-tune of a small llama.

`run_calibration(hw)` trains randomly initialised models (built from
`greentune.models.tiny.tiny_config`) with rank-16 LoRA through greentune's own training
step (its LoRA modules, sparse experts and `CausalLMLoss`), AdamW, on random tokens:

* a dense llama at two widths and a Mixtral-architecture MoE at the smaller one. Each gives
  a utilisation u = (tokens/s × F) / peak, where F is the planner's own training FLOPs per
  token for that model (`greentune.plan.cost.flops_per_token`). Small matrices use a CPU or
  GPU less well than big ones, and routed experts less well than a dense MLP, so one
  number does not fit all: a plan takes the observation of its own family (dense / MoE)
  nearest in width, rescaled along the dense width curve (log-log interpolation);
* dequantisation: seconds per weight of each quantised base format, timed on a 1024×1024
  weight on a CPU and an 8192×4096 one on a GPU (a 1024×1024 one is launch-bound there: it
  measured 3.4e-10 s/weight for Q4_K on an H200, several times what a Mixtral-sized matrix
  costs), so a QLoRA plan's dequantisation time is measured rather than bandwidth-modelled;
* power: average IT power over the timed steps, W, from `greentune.energy.meter` (NVML,
  RAPL, Apple or the labelled CPU-time estimate) when it is importable, else the
  catalogue's power figure (source ``assumed``).

Results are stored per hardware key in `calibration.json` under `$GREENTUNE_CACHE` (default
`~/.cache/greentune`); a real training run records its own observation the same way
(`record_observation`), replacing the one of its family and width, so every run improves
the next plan of a similar model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from greentune.errors import UserError
from greentune.fsutil import atomic_write_text
from greentune.plan.hardware import Hardware
from greentune.recipe import LORA_TARGETS, LoraConfig

log = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """Observed utilisation (achieved / peak FLOP/s, 0–1) and average power (W) on one machine."""

    hardware_key: str
    hardware: str
    utilisation: float
    power_w: float
    power_source: str
    tokens_per_second: float
    flops_per_token: float
    peak_flops: float
    seconds: float
    tokens: int
    measured_at: float
    method: str
    family: str = "dense"  # "dense" | "moe": what the utilisation above was measured on
    hidden: int = 0  # and at which width
    dequant_s_per_weight: dict = field(default_factory=dict)  # {format: seconds per weight}
    observations: list = field(default_factory=list)  # [Observation as dict], see below
    achieved_flops: float = 0.0  # model FLOP/s the run achieved (tokens × flops_per_token / seconds)


@dataclass(frozen=True)
class Observation:
    """One measured utilisation: of a model `family` ("dense" | "moe") at width `hidden`."""

    family: str
    hidden: int
    utilisation: float
    power_w: float
    source: str  # "calibrate" | "run"
    measured_at: float


MAX_OBSERVATIONS = 32


def family_of(facts, technique) -> str:
    return "moe" if facts.is_moe or getattr(technique, "upcycle", None) else "dense"


def cache_dir() -> Path:
    return Path(os.environ.get("GREENTUNE_CACHE") or "~/.cache/greentune").expanduser()


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def _read(path: Path) -> dict:
    if not path.is_file():
        return {"version": VERSION, "machines": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable calibration file %s: %s", path, e)
        return {"version": VERSION, "machines": {}}
    data.setdefault("machines", {})
    return data


def load_calibration(hw: Hardware, path: Path | None = None) -> Calibration | None:
    """The stored calibration for `hw` (by `hw.key`), or None."""
    row = _read(path or calibration_path())["machines"].get(hw.key)
    if not row:
        return None
    try:
        return Calibration(**row)
    except TypeError as e:
        log.warning("ignoring calibration for %s in an old format: %s", hw.key, e)
        return None


def load_observations(hw: Hardware, path: Path | None = None) -> list[Observation]:
    rows = _read(path or calibration_path()).get("observations", {}).get(hw.key, [])
    out = []
    for row in rows:
        try:
            out.append(Observation(**row))
        except TypeError:
            continue
    return out


def _interpolate(points: list[tuple[int, float]], hidden: int) -> float:
    """Log-log interpolation of (width, utilisation) points at `hidden`, flat beyond the ends."""
    points = sorted(points)
    if hidden <= points[0][0]:
        return points[0][1]
    if hidden >= points[-1][0]:
        return points[-1][1]
    for (h0, u0), (h1, u1) in zip(points, points[1:]):
        if h0 <= hidden <= h1:
            if h0 == h1:
                return u1
            f = (math.log(hidden) - math.log(h0)) / (math.log(h1) - math.log(h0))
            return math.exp(math.log(u0) + f * (math.log(u1) - math.log(u0)))
    return points[-1][1]


def utilisation_for(hw: Hardware, facts, technique, path: Path | None = None) -> tuple[float, str] | None:
    """The calibrated utilisation for training `facts` with `technique` on `hw`, and how it
    was chosen; None when nothing was measured on `hw`."""
    obs = load_observations(hw, path)
    family, hidden = family_of(facts, technique), facts.hidden
    dense = {}
    for o in sorted(obs, key=lambda o: o.measured_at):  # newest per width wins
        if o.family == "dense":
            dense[o.hidden] = o.utilisation
    curve = list(dense.items())
    same = [o for o in obs if o.family == family]
    if same:
        best = min(same, key=lambda o: (abs(math.log(o.hidden / hidden)), -o.measured_at))
        u = best.utilisation
        note = f"{family} model of width {best.hidden} measured ({best.source})"
        if len(curve) >= 2 and best.hidden != hidden:
            u *= _interpolate(curve, hidden) / _interpolate(curve, best.hidden)
            note += f", rescaled to width {hidden} along the dense width curve"
        return u, note
    if curve:
        return _interpolate(curve, hidden), f"dense width curve at {hidden} (no {family} model measured)"
    return None


def store_calibration(cal: Calibration, path: Path | None = None) -> Path:
    """Write (replace) `cal` for its hardware key, adding its observations (each replacing
    an older one of the same family and width); returns the file's path."""
    if not 0 < cal.utilisation <= 1.5 or cal.power_w < 0:
        raise ValueError(f"implausible calibration: utilisation {cal.utilisation}, power {cal.power_w} W")
    path = path or calibration_path()
    data = _read(path)
    data["version"] = VERSION
    old = data["machines"].get(cal.hardware_key) or {}
    row = asdict(cal)
    if not row["dequant_s_per_weight"]:  # a run's record keeps the timings of the last calibration
        row["dequant_s_per_weight"] = old.get("dequant_s_per_weight", {})
    new_obs = row["observations"]
    data["machines"][cal.hardware_key] = row
    kept = [
        o
        for o in data.setdefault("observations", {}).get(cal.hardware_key, [])
        if not any(o.get("family") == n["family"] and o.get("hidden") == n["hidden"] for n in new_obs)
    ]
    data["observations"][cal.hardware_key] = (kept + new_obs)[-MAX_OBSERVATIONS:]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def store_streaming_rate(hw: Hardware, fmt: str, gbs: float, threads: int, path: Path | None = None) -> Path:
    """Record the weight-streaming rate a measured llama.cpp decode of a `fmt` GGUF implied on
    `hw` at `threads` threads (see `plan.inference.effective_bandwidth_gbs`); the serving
    projection for `hw` then uses it instead of the catalogue's bandwidth. Replaces the last one."""
    if not gbs > 0:
        raise ValueError(f"implausible streaming rate {gbs} GB/s")
    path = path or calibration_path()
    data = _read(path)
    data.setdefault("streaming", {}).setdefault(hw.key, {})[fmt.lower()] = {
        "gbs": float(gbs),
        "threads": int(threads),
        "measured_at": time.time(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_streaming_rate(hw: Hardware, fmt: str, path: Path | None = None) -> dict | None:
    """{"gbs", "threads", "measured_at"} stored for `hw` and `fmt`, or None."""
    row = _read(path or calibration_path()).get("streaming", {}).get(hw.key, {}).get(fmt.lower())
    return (
        row if isinstance(row, dict) and isinstance(row.get("gbs"), (int, float)) and row["gbs"] > 0 else None
    )


# ---------------------------------------------------------------- the measured run


def _sizes(on_gpu: bool) -> dict:
    if on_gpu:
        return dict(
            hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=32000, seq=1024, batch=8
        )
    return dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, vocab=4096, seq=256, batch=4)


def _measure_training(
    cfg, technique, s: dict, seconds: float, max_steps: int, warmup_steps: int, device: str, dtype, meter
) -> tuple[float, float, float, int, int]:
    """Time LoRA training steps of a fresh model from `cfg` through greentune's own step.

    Returns (utilisation numerator: tokens/s × F, seconds, joules, tokens, steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.adapters.lora import apply_lora
    from greentune.models.facts import arch_facts
    from greentune.moe import prepare_moe_
    from greentune.plan.cost import flops_per_token
    from greentune.train.loss import CausalLMLoss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig()  # the recipe's default adapter
    apply_lora(model, [t for t in technique.targets if t != "experts"], lora.rank, lora.alpha, lora.dropout)
    if "experts" in technique.targets:
        prepare_moe_(model, lora_on_experts=True)
        add_expert_lora_(model, r=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
    objective = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    mask = torch.ones_like(batch)
    n_items = torch.tensor(float(s["batch"] * (s["seq"] - 1)), device=device)

    def step():
        objective(batch, mask, batch, n_items).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    window = meter.start("calibrate") if meter else None
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < seconds):
        step()
        steps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    joules = window.end().total_joules if window is not None else float("nan")
    tokens = steps * s["batch"] * s["seq"]
    fpt = flops_per_token(arch_facts(cfg), technique, s["seq"], False)
    return tokens / elapsed * fpt, elapsed, joules, tokens, steps


def dequant_probe_shape(device: str) -> tuple[int, int]:
    """(out, in) of the weight the dequantisation is timed on: big enough on a GPU that the
    per-weight time is not kernel-launch overhead (see the module docstring)."""
    return (8192, 4096) if device.startswith("cuda") else (1024, 1024)


def _time_dequantisation(
    device: str, repeats: int = 5, shape: tuple[int, int] | None = None
) -> dict[str, float]:
    """Seconds per weight to dequantise each base format, as a quantised layer does per pass."""
    import torch
    from torch import nn

    from greentune.plan.cost import BPW
    from greentune.quant.linear import QuantLinear

    out = {}
    torch.manual_seed(0)
    rows, cols = shape or dequant_probe_shape(device)
    linear = nn.Linear(cols, rows, bias=False).to(device)
    for fmt in (f for f, bpw in BPW.items() if bpw is not None and bpw < 16):
        layer = QuantLinear.from_linear(linear, fmt)
        layer._weight(None, torch.float32)  # warm-up (and any lazy set-up)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer._weight(None, torch.float32)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[fmt] = (time.perf_counter() - t0) / (repeats * linear.weight.numel())
    return out


def run_calibration(
    hw: Hardware,
    seconds: float = 20.0,
    max_steps: int = 200,
    warmup_steps: int = 2,
    device: str | None = None,
    sizes: dict | None = None,
) -> Calibration:
    """Measure utilisation (dense at two widths, MoE at one), dequantisation speed and power
    for LoRA training on `hw` (this machine); does not store it."""
    import torch

    from greentune.models.tiny import tiny_config
    from greentune.plan.cost import Technique

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    s = dict(_sizes(on_gpu), **(sizes or {}))
    dtype = torch.float32 if hw.compute_dtype == "fp32" else torch.bfloat16
    meter = None
    try:
        from greentune.energy.meter import Meter

        meter = Meter.auto(scope="self", poll_interval_s=0.5)
    except Exception as e:  # noqa: BLE001 — calibrate time even without an energy meter
        log.warning("no energy meter (%s); power taken from the hardware catalogue", e)

    def config(hidden: int, moe: bool):
        scale = hidden / s["hidden"]
        return tiny_config(
            "mixtral" if moe else "llama",
            vocab_size=s["vocab"],
            hidden=hidden,
            layers=s["layers"],
            heads=s["heads"],
            kv_heads=s["kv_heads"],
            intermediate=int(s["intermediate"] * scale) // (2 if moe else 1),
            experts=4,
            top_k=2,
            max_positions=s["seq"],
        )

    runs = [(s["hidden"] // 2, False), (s["hidden"], False), (s["hidden"] // 2, True)]
    dense_t = Technique("lora", "lora", targets=LORA_TARGETS)
    moe_t = Technique("lora", "lora", targets=("attn", "experts"))
    observations, total_s, total_j, main = [], 0.0, 0.0, None
    try:
        for hidden, moe in runs:
            work, elapsed, joules, tokens, steps = _measure_training(
                config(hidden, moe),
                moe_t if moe else dense_t,
                s,
                seconds / len(runs),
                max_steps,
                warmup_steps,
                device,
                dtype,
                meter,
            )
            util = work / hw.peak_flops
            if not util > 0:
                raise UserError("calibration measured no progress; is the machine overloaded?")
            power = joules / elapsed if meter is not None and elapsed > 0 else hw.power_w + hw.host_w
            observations.append(
                asdict(Observation("moe" if moe else "dense", hidden, util, power, "calibrate", time.time()))
            )
            total_s, total_j = total_s + elapsed, total_j + (joules if meter is not None else 0.0)
            if hidden == s["hidden"] and not moe:
                main = (util, work, elapsed, tokens, steps)
        dequant = _time_dequantisation(device)
    finally:
        if meter is not None:
            meter.close()
    util, work, elapsed, tokens, steps = main
    if meter is not None:
        power, source = total_j / total_s, "+".join(sorted(set(meter.sources().values()))) or "none"
    else:
        power, source = hw.power_w + hw.host_w, "assumed"
    from greentune.models.facts import arch_facts
    from greentune.plan.cost import flops_per_token

    fpt = flops_per_token(arch_facts(config(s["hidden"], False)), dense_t, s["seq"], False)
    return Calibration(
        hardware_key=hw.key,
        hardware=hw.name,
        utilisation=util,
        power_w=power,
        power_source=source,
        tokens_per_second=work / fpt,
        flops_per_token=fpt,
        peak_flops=hw.peak_flops,
        seconds=elapsed,
        tokens=tokens,
        measured_at=time.time(),
        method=(
            f"greentune LoRA r{LoraConfig().rank}, llama h{s['hidden'] // 2}/h{s['hidden']} "
            f"and mixtral h{s['hidden'] // 2} "
            f"(4 experts top-2) L{s['layers']} V{s['vocab']}, {s['batch']}×{s['seq']} tokens/step, "
            f"{device} {hw.compute_dtype}, AdamW"
        ),
        family="dense",
        hidden=s["hidden"],
        dequant_s_per_weight=dequant,
        observations=observations,
    )


@dataclass(frozen=True)
class ObservedRun:
    """What a finished run measured (training tokens, seconds, joules; None: not metered, and
    where the joules came from) and the sequence length and micro-batch it trained with."""

    tokens: int
    seconds: float
    joules: float | None
    seq_len: int
    micro_batch: int = 1
    power_source: str = "ledger"


def record_observation(
    hw: Hardware,
    facts,
    technique,
    run: ObservedRun,
    checkpointing: bool = False,
    store: bool = True,
    path: Path | None = None,
) -> Calibration:
    """Turn a real run's measured training seconds and joules into a calibration for `hw`.

    utilisation = tokens × F / ((seconds − dequantisation seconds) × peak), F =
    `cost.flops_per_token(facts, technique, seq_len, checkpointing)`, the dequantisation
    seconds as the planner models them (calibrated per format when timed); power = joules /
    seconds (W). The training pipeline calls this at the end of a run, so the next plan of
    a model of this family and width on this machine starts from what was measured.
    `store=False` only computes it.
    """
    from greentune.plan.cost import Workload, dequant_seconds, flops_per_token, requant_seconds

    tokens, seconds, joules, seq_len = run.tokens, run.seconds, run.joules, run.seq_len
    power_source, micro_batch = run.power_source, run.micro_batch
    if seconds <= 0 or tokens <= 0:
        raise ValueError(f"need positive seconds and tokens, got {seconds}, {tokens}")
    if getattr(technique, "upcycle", None):
        facts = facts.upcycled(*technique.upcycle)
    fpt = flops_per_token(facts, technique, seq_len, checkpointing)
    old = load_calibration(hw, path)
    rates = old.dequant_s_per_weight if old else {}
    w = Workload(tokens=int(tokens), seq_len=seq_len, micro_batch=max(1, micro_batch))
    dq = dequant_seconds(facts, technique, w, hw, checkpointing, rates)
    dq = min(dq + requant_seconds(facts, technique, w, hw), 0.9 * seconds)
    tps = tokens / seconds
    util = tokens * fpt / ((seconds - dq) * hw.peak_flops)
    power = (joules / seconds) if joules is not None else hw.power_w + hw.host_w
    cal = Calibration(
        hardware_key=hw.key,
        hardware=hw.name,
        utilisation=util,
        power_w=power,
        power_source=power_source if joules is not None else "assumed",
        tokens_per_second=tps,
        flops_per_token=fpt,
        peak_flops=hw.peak_flops,
        seconds=seconds,
        tokens=int(tokens),
        measured_at=time.time(),
        method=f"observed run: {technique.name}, {facts.model_type}, seq {seq_len}",
        family=family_of(facts, technique),
        hidden=facts.hidden,
        dequant_s_per_weight=dict(rates),
        observations=[
            asdict(Observation(family_of(facts, technique), facts.hidden, util, power, "run", time.time()))
        ],
        achieved_flops=tps * fpt,
    )
    if store:
        store_calibration(cal, path)
    return cal
