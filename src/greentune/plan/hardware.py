"""The hardware catalogue (`data_files/hardware.yaml`) and this machine, as `Hardware` rows.

Names match case-insensitively with spaces, dashes and underscores ignored; a name, an
alias, or a unique prefix/substring of one selects a row. `"this"` describes the current
machine: NVIDIA GPUs through NVML (nvidia-ml-py) when present, matched to a catalogue row
by name, else the CPU from psutil with a theoretical fp32 peak of
cores × clock × FLOPs/cycle (32 with AVX2+FMA, 64 with AVX-512, 16 otherwise).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources

import yaml

from greentune.errors import UserError

log = logging.getLogger(__name__)

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One device as the planner sees it.

    Attributes:
        name: canonical name; key: the normalised name used for calibration records.
        kind: ``gpu`` | ``apple`` | ``cpu``.
        memory_gb: device (or unified/host) memory, GB (1e9 bytes).
        bandwidth_gbs: memory bandwidth, GB/s.
        bf16_tflops / fp32_tflops: peak dense throughput, TFLOP/s.
        power_w: board (GPU), package (CPU) or whole-machine (Apple) power, W.
        host_w: the rest of the machine while training, W (an assumption).
        site: ``datacentre`` | ``desk`` (default PUE/WUE).
        source: where the figures come from.
    """

    name: str
    kind: str
    memory_gb: float
    bandwidth_gbs: float
    bf16_tflops: float
    fp32_tflops: float
    power_w: float
    host_w: float
    site: str
    source: str
    aliases: tuple[str, ...] = field(default=(), repr=False)
    note: str = ""
    catalogue_name: str = ""  # for `this`: the catalogue row it was matched to, if any
    cores: int = 0  # a CPU's cores (`this`; 0: not known), for work that scales with cores only

    @property
    def key(self) -> str:
        return _norm(self.name)

    @property
    def compute_dtype(self) -> str:
        """bf16 on GPUs and Apple, fp32 on CPUs (no bf16 units; DESIGN.md)."""
        return "fp32" if self.kind == "cpu" else "bf16"

    @property
    def peak_flops(self) -> float:
        """Peak FLOP/s in the compute dtype."""
        tf = self.fp32_tflops if self.compute_dtype == "fp32" else self.bf16_tflops
        return tf * 1e12

    @property
    def usable_fraction(self) -> float:
        """Share of memory a training process can use: GPUs ~0.95 (CUDA context, fragmentation
        are counted separately), Apple 0.75 (macOS's default GPU wired limit), CPUs 0.9 (OS)."""
        return {"gpu": 0.95, "apple": 0.75, "cpu": 0.9}[self.kind]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(s).lower())


@cache
def catalogue() -> tuple[Hardware, ...]:
    """All rows of `data_files/hardware.yaml`."""
    text = resources.files("greentune").joinpath("data_files/hardware.yaml").read_text(encoding="utf-8")
    rows = []
    for r in yaml.safe_load(text):
        rows.append(
            Hardware(
                name=r["name"],
                kind=r["kind"],
                memory_gb=float(r["memory_gb"]),
                bandwidth_gbs=float(r["bandwidth_gbs"]),
                bf16_tflops=float(r["bf16_tflops"]),
                fp32_tflops=float(r["fp32_tflops"]),
                power_w=float(r["power_w"]),
                host_w=float(r["host_w"]),
                site=r["site"],
                source=r["source"],
                aliases=tuple(str(a) for a in r.get("aliases", [])),
                note=str(r.get("note", "")),
            )
        )
    return tuple(rows)


def find_hardware(name: str) -> Hardware:
    """The catalogue row `name` denotes, or this machine for ``this``.

    Exact (normalised) name or alias wins; otherwise every row with a name or alias that
    starts with, or contains, the query. Raises UserError for no match (listing the known
    short names) or several (listing the candidates).
    """
    q = _norm(name)
    if not q:
        raise UserError("empty --hardware name")
    if q in ("this", "here", "local"):
        return detect_this()
    rows = catalogue()
    exact = [h for h in rows if q == _norm(h.name) or q in (_norm(a) for a in h.aliases)]
    if len(exact) == 1:
        return exact[0]
    for test in (lambda k: k.startswith(q), lambda k: q in k):
        hits = [h for h in rows if any(test(k) for k in (_norm(h.name), *(_norm(a) for a in h.aliases)))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise UserError(f"hardware {name!r} is ambiguous: {'; '.join(h.name for h in hits)}")
    known = ", ".join(h.aliases[0] if h.aliases else h.name for h in rows)
    raise UserError(f"unknown hardware {name!r}; known: {known}, this")


# ---------------------------------------------------------------- this machine


def _cpu_flops_per_cycle() -> int:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 16
    if " avx512f" in flags:
        return 64
    if " avx2" in flags and " fma" in flags:
        return 32
    return 16


def _cpu_model() -> str:
    try:
        from greentune.energy.hardware import cpu_model

        return cpu_model()
    except Exception:  # noqa: BLE001 — the energy package is optional here
        import platform

        return platform.processor() or platform.machine()


def _cpu_watts(threads: int) -> tuple[float, str]:
    """Package power for `threads` busy threads: the energy estimate's W per thread."""
    try:
        from greentune.energy.estimate import cpu_power

        p = cpu_power()
        return p.w_per_thread * threads, p.basis
    except Exception:  # noqa: BLE001
        return 4.0 * threads, "4 W per thread (CodeCarbon default)"


def _nvidia_gpus(pynvml=None) -> list[tuple[str, float]]:
    """(name, memory GB) of each NVIDIA GPU NVML sees; [] without NVML."""
    from greentune.energy.hardware import nvidia_gpus

    return nvidia_gpus(pynvml)


def _match_gpu(nvml_name: str, memory_gb: float) -> Hardware | None:
    """The catalogue GPU whose name's model token (H100, A100, 4090, L40S...) appears in the NVML name."""
    n = _norm(nvml_name)
    hits = [h for h in catalogue() if h.kind == "gpu" and any(_norm(a) in n for a in h.aliases)]
    if not hits:
        return None
    best = max(
        hits,
        key=lambda h: (max(len(_norm(a)) for a in h.aliases if _norm(a) in n), -abs(h.memory_gb - memory_gb)),
    )
    return replace(best, memory_gb=round(memory_gb, 1))


def detect_this(pynvml=None) -> Hardware:
    """This machine: its first NVIDIA GPU if NVML sees one, else its CPU (psutil)."""
    import psutil

    gpus = _nvidia_gpus(pynvml)
    if gpus:
        name, mem = gpus[0]
        row = _match_gpu(name, mem)
        if row is not None:
            return replace(
                row,
                name=f"this: {name}",
                source=f"NVML name {name!r} matched to {row.name}",
                catalogue_name=row.name,
            )
        log.warning("GPU %r is not in the hardware catalogue; planning on the CPU", name)
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    threads = psutil.cpu_count() or cores
    try:
        import os

        threads = len(os.sched_getaffinity(0))
        cores = min(cores, threads)
    except AttributeError:
        pass
    freq = psutil.cpu_freq()
    ghz = (freq.max or freq.current) / 1000 if freq and (freq.max or freq.current) else 2.5
    fpc = _cpu_flops_per_cycle()
    tflops = cores * ghz * fpc / 1000
    watts, basis = _cpu_watts(threads)
    mem = psutil.virtual_memory().total / GB
    model = _cpu_model()
    return Hardware(
        name=f"this: {model} ({cores} cores)",
        kind="cpu",
        memory_gb=round(mem, 1),
        bandwidth_gbs=20.0 * cores,
        bf16_tflops=tflops,
        fp32_tflops=tflops,
        power_w=watts,
        host_w=0.375 * mem,
        site="desk",
        cores=cores,
        source=(
            f"psutil: {cores} cores × {ghz:.2f} GHz × {fpc} FLOPs/cycle; power {basis}; "
            f"rest: 0.375 W/GB of RAM; bandwidth 20 GB/s per core (assumed)"
        ),
        aliases=("this",),
    )


#: Caps the memory a run may plan with, in GB (1e9 bytes, the planner's GB), on any device: for a
#: machine shared with other jobs, and for tests of what happens when something does not fit.
MEMORY_LIMIT_ENV = "GREENTUNE_MEMORY_GB"


def run_memory_bytes(device="cpu") -> tuple[float, str]:
    """The memory this process may fill while it trains on `device`, bytes, and where that figure
    came from: `GREENTUNE_MEMORY_GB` when set; a CUDA device's total × the GPU usable fraction;
    on the CPU the machine's available RAM (psutil) plus what this process already holds
    (the planner's totals include the model this process may already have loaded)."""
    import os

    import psutil

    raw = os.environ.get(MEMORY_LIMIT_ENV)
    if raw:
        try:
            gb = float(raw)
        except ValueError:
            gb = -1.0
        if not gb > 0:
            raise UserError(f"{MEMORY_LIMIT_ENV}={raw!r}: expected a positive number of GB")
        return gb * GB, f"{MEMORY_LIMIT_ENV}={raw}"
    if device_type(device) == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        return total * 0.95, "CUDA device memory × 0.95"
    held = psutil.Process().memory_info().rss
    return float(psutil.virtual_memory().available + held), "available RAM + this process's RSS (psutil)"


def device_type(device) -> str:
    """ "cpu", "cuda", "mps", … of a torch device or its name."""
    return getattr(device, "type", str(device).split(":")[0])


def this_hardware_for(device) -> Hardware:
    """This machine (`detect_this`) as the kind of device a run trains on, so that the
    planner's compute dtype is the run's (a CPU run on a GPU machine computes in fp32)."""
    hw = detect_this()
    on_gpu = device_type(device) != "cpu"
    if (hw.kind == "cpu") == on_gpu:
        hw = replace(hw, kind="gpu" if on_gpu else "cpu")
    return hw
