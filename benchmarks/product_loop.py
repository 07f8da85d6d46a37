"""The product path for the throughput benchmarks: `run_training` itself, with the hooks
`greentune train` gives it (energy meter + ledger, the MoE router monitor when the model has
routers, clipping at the recipe default, metrics.jsonl, the progress bar), timed per step.

Imported by `train_throughput.py` and `moe_throughput.py` (not a benchmark on its own).

A step's time is the wall-clock between the starts of consecutive steps (a first hook
stamps `before_step`), so it covers everything the loop does per step: the step itself,
clipping, the hooks' after-step work, the metrics line and the bar. Warm-up steps are
dropped; the final step (followed by the run's closing checkpoint) is not timed.

Within each of those steps the bare step's own work is timed too (`StepTimes.core`: the
objective's forward, backward and the optimiser step, the same calls the bare step makes), so
the loop's cost is also measured paired, step by step: `StepTimes.loop_overhead`. On a shared
VM, separate runs of the bare step and the loop drift by several per cent between rounds; the
paired split does not, because both parts are read off the same steps.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from greentune.data.packing import BatchStream, PackedData
from greentune.energy.factors import Factors
from greentune.energy.ledger import Ledger
from greentune.energy.meter import Meter
from greentune.recipe import EnergyConfig, TrainConfig
from greentune.train.energy_hook import EnergyHook
from greentune.train.hooks import TrainHook
from greentune.train.loop import run_training
from greentune.train.loss import CausalLMLoss


class _StepClock(TrainHook):
    def __init__(self):
        self.starts: list[float] = []

    def before_step(self, step: int) -> None:
        self.starts.append(time.perf_counter())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _SyncedClock(_StepClock):
    cores: list[float] | None = None

    def before_step(self, step: int) -> None:
        _sync(self.device)
        super().before_step(step)
        if self.cores is not None:
            self.cores.append(0.0)


@dataclass
class StepTimes:
    """Seconds of each timed step of `run_training` (`total`) and, of each, the part spent in
    the bare step's own calls (`core`: the objective's forward, backward, the optimiser step)."""

    total: list[float] = field(default_factory=list)
    core: list[float] = field(default_factory=list)

    def extend(self, other: StepTimes) -> None:
        self.total += other.total
        self.core += other.core

    @property
    def loop_overhead(self) -> float:
        """Median over steps of (step - its core) / its core: what the loop adds to the step."""
        return median([(t - c) / c for t, c in zip(self.total, self.core)])


@contextlib.contextmanager
def _core_clock(device, per_step: list[float]):
    """Adds the seconds spent in `CausalLMLoss.forward`, `Tensor.backward` and every optimiser
    step to `per_step[-1]` while active (the caller appends a 0.0 at each step start)."""
    forward, backward = CausalLMLoss.forward, torch.Tensor.backward

    def timed(f):
        def call(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            _sync(device)
            per_step[-1] += time.perf_counter() - t0
            return out

        return call

    started: list[float] = []

    def pre(opt, args, kwargs):
        _sync(device)
        started.append(time.perf_counter())

    def post(opt, args, kwargs):
        _sync(device)
        per_step[-1] += time.perf_counter() - started.pop()

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    CausalLMLoss.forward, torch.Tensor.backward = timed(forward), timed(backward)
    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield
    finally:
        CausalLMLoss.forward, torch.Tensor.backward = forward, backward
        for h in handles:
            h.remove()


def run_training_step_times(
    model,
    batch: dict,
    steps: int,
    *,
    warmup: int = 1,
    monitor=None,
    device="cpu",
    max_grad_norm: float | None = None,
    progress: bool = True,
) -> StepTimes:
    """Seconds of each of `steps` timed steps of `run_training` on `model` (its trainable
    parameters), every step on `batch` (one global batch, one micro-batch), with the default
    hooks, and of each its core (see `StepTimes`). `monitor`: the model's `RouterMonitor`; by
    default one is hooked on a model with MoE routers for the run and removed after, as
    `greentune train` hooks it."""
    from greentune.moe.router import RouterMonitor, find_routers
    from greentune.train.moe_hook import MoEHook

    own_monitor = monitor is None and bool(find_routers(model))
    if own_monitor:  # as `greentune train` hooks every MoE model (moe.prepare.prepare_moe_)
        monitor = RouterMonitor(model)
    b = batch["input_ids"].shape[0]
    total = warmup + steps + 1
    # The data is the batch's own rows: every epoch of the stream is one batch, those rows in a
    # shuffled order, so each step computes on exactly the bare step's sequences (rows repeated
    # across epochs in one pool would mix duplicates into a batch, and an MoE step's cost
    # depends on its tokens' routing).
    rows = {k: v.detach().cpu() for k, v in batch.items()}
    data = PackedData(rows["input_ids"], rows["labels"], rows["attention_mask"])
    train = TrainConfig()
    cfg = TrainConfig(
        steps=total,
        batch_size=b,
        lr=1e-4,
        warmup=0,
        max_grad_norm=train.max_grad_norm if max_grad_norm is None else max_grad_norm,
        checkpoint_every=10**9,  # only the closing checkpoint, after the last timed step
    )
    energy = EnergyConfig()
    cores: list[float] = []
    clock = _SyncedClock()
    clock.device = device
    clock.cores = cores
    with tempfile.TemporaryDirectory(prefix="gt-bench-") as tmp:
        meter = Meter.auto()
        try:
            ledger = Ledger(tmp, Factors.for_region(energy.region))
            hooks = [clock, EnergyHook(meter, ledger, energy.interval_steps, energy.budget_kwh)]
            if monitor is not None:
                hooks.append(MoEHook(monitor))
            with _core_clock(device, cores):
                run_training(
                    model,
                    BatchStream(data, b, 0),
                    cfg,
                    Path(tmp),
                    hooks=hooks,
                    device=device,
                    progress=progress,
                )
        finally:
            meter.close()
            if own_monitor:
                monitor.close()  # the bare step after this one runs without the router hooks
    gaps = [t1 - t0 for t0, t1 in zip(clock.starts, clock.starts[1:])]
    return StepTimes(gaps[warmup:], cores[warmup : len(gaps)])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def hf_loop_step(model, batch: dict, max_grad_norm: float | None = None):
    """One step of a minimal transformers-style training loop (the model's own `.loss`,
    backward, the same clipping as greentune's default, AdamW, the loss read for logging)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    clip = TrainConfig().max_grad_norm if max_grad_norm is None else max_grad_norm

    def step():
        loss = model(**batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def heap_as_the_product_sets_it(model, batch: dict, device="cpu", monitor=None) -> str:
    """Fix the host heap as `greentune train`'s loaders do, then let one step of `run_training`
    apply its training policy (`train.heap_policy`); every contestant after runs under the
    setting it leaves. Returns a line saying which."""
    from greentune import heap

    heap.limit_heap_retention()
    run_training_step_times(model, batch, 0, warmup=0, monitor=monitor, device=device, progress=False)
    t = heap.fixed_threshold
    return (
        f"host heap: mmap threshold {'glibc default' if t is None else f'{t >> 20} MB'} after the first step"
    )
