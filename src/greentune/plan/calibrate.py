"""Calibrate the planner on this machine: a short measured LoRA fine-tune of a small llama.

`run_calibration(hw)` trains a randomly initialised llama (built from
`greentune.models.tiny.tiny_config`) with rank-16 LoRA on attention and MLP and a plain
torch AdamW loop, on random tokens, and measures:

* utilisation u = (tokens/s × F) / peak, where F is the planner's own training FLOPs per
  token for this model and technique (`greentune.plan.cost.flops_per_token`), so the next
  plan's time = FLOPs / (peak × u) reproduces what was measured;
* power: average IT power over the timed steps, W, from `greentune.energy.meter` (NVML,
  RAPL, Apple or the labelled CPU-time estimate) when it is importable, else the
  catalogue's power figure (source ``assumed``).

Results are stored per hardware key in `calibration.json` under `$GREENTUNE_CACHE` (default
`~/.cache/greentune`); `store_calibration` is also what a real training run calls to
record its own observed utilisation and power, so every run improves the next plan.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from greentune.errors import UserError
from greentune.fsutil import atomic_write_text
from greentune.plan.hardware import Hardware

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


def store_calibration(cal: Calibration, path: Path | None = None) -> Path:
    """Write (replace) `cal` for its hardware key; returns the file's path."""
    if not 0 < cal.utilisation <= 1.5 or cal.power_w < 0:
        raise ValueError(f"implausible calibration: utilisation {cal.utilisation}, power {cal.power_w} W")
    path = path or calibration_path()
    data = _read(path)
    data["version"] = VERSION
    data["machines"][cal.hardware_key] = asdict(cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- the measured run

def _sizes(on_gpu: bool) -> dict:
    if on_gpu:
        return dict(hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=32000, seq=1024, batch=8)
    return dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, vocab=4096, seq=256, batch=4)


def _add_lora(model, rank: int):
    """Freeze `model`; wrap every attention/MLP nn.Linear as W·x + B·A·x·(2r/r) (B zero-initialised)."""
    import torch
    from torch import nn

    class _Lora(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / rank)
            self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

        def forward(self, x):
            return self.base(x) + (x.to(self.a.dtype) @ self.a.t() @ self.b.t()).to(x.dtype) * 2.0

    for p in model.parameters():
        p.requires_grad_(False)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name in names:
                setattr(parent, child_name, _Lora(child))
    return [p for p in model.parameters() if p.requires_grad]


def run_calibration(hw: Hardware, seconds: float = 20.0, max_steps: int = 200, warmup_steps: int = 2,
                    device: str | None = None, sizes: dict | None = None) -> Calibration:
    """Measure utilisation and power for LoRA training on `hw` (this machine); does not store it."""
    import torch
    from transformers import AutoModelForCausalLM

    from greentune.models.facts import arch_facts
    from greentune.models.tiny import tiny_config
    from greentune.plan.cost import Technique, flops_per_token

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    s = dict(_sizes(on_gpu), **(sizes or {}))
    cfg = tiny_config("llama", vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                      kv_heads=s["kv_heads"], intermediate=s["intermediate"], max_positions=s["seq"])
    dtype = torch.float32 if hw.compute_dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    params = _add_lora(model, rank=16)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)

    def step():
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    meter = None
    try:
        from greentune.energy.meter import Meter
        meter = Meter.auto(scope="self", poll_interval_s=0.5)
    except Exception as e:  # noqa: BLE001 — calibrate time even without an energy meter
        log.warning("no energy meter (%s); power taken from the hardware catalogue", e)
    window = meter.start("calibrate") if meter else None
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < seconds):
        step()
        steps += 1
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if window is not None:
        m = window.end()
        meter.close()
        power = m.total_joules / m.seconds if m.seconds > 0 else 0.0
        source = "+".join(sorted(set(m.source.values()))) or "none"
    else:
        power, source = hw.power_w + hw.host_w, "assumed"
    tokens = steps * s["batch"] * s["seq"]
    fpt = flops_per_token(arch_facts(cfg), Technique("lora", "lora", targets=("attn", "mlp")), s["seq"], False)
    tps = tokens / elapsed
    util = tps * fpt / hw.peak_flops
    if not util > 0:
        raise UserError("calibration measured no progress; is the machine overloaded?")
    return Calibration(
        hardware_key=hw.key, hardware=hw.name, utilisation=util, power_w=power, power_source=source,
        tokens_per_second=tps, flops_per_token=fpt, peak_flops=hw.peak_flops, seconds=elapsed, tokens=tokens,
        measured_at=time.time(),
        method=(f"LoRA r16 attn+mlp, llama h{s['hidden']} L{s['layers']} ff{s['intermediate']} V{s['vocab']}, "
                f"{s['batch']}×{s['seq']} tokens/step, {steps} steps, {device} {hw.compute_dtype}, AdamW"))


def record_observation(hw: Hardware, facts, technique, seq_len: int, tokens: int, seconds: float,
                       joules: float | None, power_source: str = "ledger", checkpointing: bool = False,
                       store: bool = True, path: Path | None = None) -> Calibration:
    """Turn a real run's measured training seconds and joules into a calibration for `hw`.

    utilisation = tokens × F / (seconds × peak), F = `cost.flops_per_token(facts, technique,
    seq_len, checkpointing)`; power = joules / seconds (W). The training pipeline calls this
    at the end of a run (and may write `asdict(result)` into its run dir), so the next plan
    on this machine starts from what was measured. `store=False` only computes it.
    """
    from greentune.plan.cost import flops_per_token

    if seconds <= 0 or tokens <= 0:
        raise ValueError(f"need positive seconds and tokens, got {seconds}, {tokens}")
    fpt = flops_per_token(facts, technique, seq_len, checkpointing)
    tps = tokens / seconds
    cal = Calibration(
        hardware_key=hw.key, hardware=hw.name, utilisation=tps * fpt / hw.peak_flops,
        power_w=(joules / seconds) if joules is not None else hw.power_w + hw.host_w,
        power_source=power_source if joules is not None else "assumed", tokens_per_second=tps,
        flops_per_token=fpt, peak_flops=hw.peak_flops, seconds=seconds, tokens=int(tokens),
        measured_at=time.time(), method=f"observed run: {technique.name}, {facts.model_type}, seq {seq_len}")
    if store:
        store_calibration(cal, path)
    return cal
