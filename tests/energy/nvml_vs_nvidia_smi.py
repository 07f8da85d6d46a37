"""Check greentune's NVML meter against nvidia-smi power readings over the same window.

Run on a machine with an NVIDIA GPU (not collected by pytest):

    python tests/energy/nvml_vs_nvidia_smi.py [--seconds 20]

It loads GPU 0 with matmuls for `--seconds`, meters the window with `NvmlGpu` (total-energy
counter; and a second, forced power-integration component), while `nvidia-smi` samples
`power.draw` every 100 ms in a subprocess; it prints the three energies in joules and
their ratios as one JSON line. Expect the counter and nvidia-smi to agree within a few %.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    import pynvml
    import torch

    from greentune.energy.meter import Meter
    from greentune.energy.nvml import NvmlGpu

    pynvml.nvmlInit()
    counter = NvmlGpu(pynvml, 0)
    assert counter.source == "nvml", f"GPU 0 has no energy counter (source {counter.source})"
    power = NvmlGpu(pynvml, 0)
    power.name, power.source = "gpu:0-power", "nvml-power"  # force power integration for comparison
    power.last_t, power.last_w = power.clock(), power._power_w()
    meter = Meter([counter, power], poll_interval_s=0.1)

    smi = subprocess.Popen(
        [
            "nvidia-smi",
            "-i",
            "0",
            "--query-gpu=timestamp,power.draw",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: list[tuple[float, float]] = []

    def collect() -> None:
        for line in smi.stdout:
            try:
                samples.append((time.monotonic(), float(line.rsplit(",", 1)[1])))
            except (IndexError, ValueError):
                pass

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(1.0)
    a = torch.randn(8192, 8192, device="cuda")
    with meter.phase("load") as w:
        t0 = time.monotonic()
        end = t0 + args.seconds
        while time.monotonic() < end:
            a = torch.tanh(a @ a)
        torch.cuda.synchronize()
        t1 = time.monotonic()
    smi.terminate()
    reader.join(timeout=5)
    meter.close()
    inside = [(t, p) for t, p in samples if t0 <= t <= t1]
    smi_j = sum((p0 + p1) / 2 * (ta1 - ta0) for (ta0, p0), (ta1, p1) in zip(inside, inside[1:]))
    smi_j *= (t1 - t0) / max(1e-9, inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0
    m = w.result
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    out = {
        "gpu": name.decode() if isinstance(name, bytes) else name,
        "seconds": m.seconds,
        "nvml_counter_j": m.joules["gpu:0"],
        "nvml_power_j": m.joules["gpu:0-power"],
        "nvidia_smi_j": smi_j,
        "mean_w_counter": m.joules["gpu:0"] / m.seconds,
        "smi_samples": len(inside),
        "counter_over_smi": m.joules["gpu:0"] / smi_j if smi_j else None,
        "power_over_counter": m.joules["gpu:0-power"] / m.joules["gpu:0"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
