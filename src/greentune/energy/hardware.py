"""What machine this is: CPU model, threads, memory, GPUs. Recorded beside every bill."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import psutil


def cpu_model() -> str:
    """The CPU's marketing name, normalised (no (R)/(TM), no clock), or the platform's guess."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1]
                break
    except OSError:
        pass
    if not name and platform.system() == "Darwin":
        try:
            import subprocess  # noqa: PLC0415

            name = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    name = name or platform.processor() or platform.machine()
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"\s+CPU\b|@.*$|\d+-Core Processor", "", name)
    return " ".join(name.split())


def nvidia_gpus(pynvml=None) -> list[tuple[str, float]]:
    """(name, memory in GB) of each NVIDIA GPU NVML sees; [] without NVML or a driver."""
    if pynvml is None:
        try:
            import pynvml  # noqa: PLC0415  (optional hardware library)
        except ImportError:
            return []
    try:
        pynvml.nvmlInit()
        out = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            n = pynvml.nvmlDeviceGetName(h)
            out.append(
                (
                    n.decode() if isinstance(n, bytes) else str(n),
                    pynvml.nvmlDeviceGetMemoryInfo(h).total / 1e9,
                )
            )
        return out
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []


def gpu_names(pynvml=None) -> list[str]:
    """Names of the NVIDIA GPUs NVML sees ([] without NVML)."""
    return [name for name, _ in nvidia_gpus(pynvml)]


def describe_hardware(pynvml=None) -> dict:
    """A JSON-ready description: cpu, logical_cpus, usable_cpus, memory_bytes, gpus, os, python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "usable_cpus": usable,
        "memory_bytes": psutil.virtual_memory().total,
        "gpus": gpu_names(pynvml),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
