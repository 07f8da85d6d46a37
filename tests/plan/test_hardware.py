"""Hardware catalogue lookup and detection of this machine."""

from __future__ import annotations

import pytest

from greentune.errors import UserError
from greentune.plan.hardware import catalogue, detect_this, find_hardware


@pytest.mark.parametrize(
    "query, name",
    [
        ("H100", "NVIDIA H100 SXM5 80GB"),
        ("h100", "NVIDIA H100 SXM5 80GB"),
        ("4090", "NVIDIA GeForce RTX 4090 24GB"),
        ("rtx-3090", "NVIDIA GeForce RTX 3090 24GB"),
        ("M2 Max", "Apple M2 Max"),
        ("m2max", "Apple M2 Max"),
        ("M2", "Apple M2"),
        ("L4", "NVIDIA L4 24GB"),
        ("L40S", "NVIDIA L40S 48GB"),
        ("A100 40GB", "NVIDIA A100 SXM4 40GB"),
        ("a100", "NVIDIA A100 SXM4 80GB"),
        ("H200", "NVIDIA H200 SXM 141GB"),
        ("M3 Ultra", "Apple M3 Ultra"),
        ("laptop", "Generic laptop CPU (4 cores)"),
    ],
)
def test_short_names_match(query, name):
    assert find_hardware(query).name == name


def test_ambiguous_name_lists_candidates():
    with pytest.raises(UserError, match="ambiguous: Apple M1; Apple M1 Pro; .*Apple M4 Max$"):
        find_hardware("apple m")
    assert find_hardware("Apple M1").name == "Apple M1"  # an exact name is never ambiguous
    with pytest.raises(UserError, match=r"ambiguous: NVIDIA H100 SXM5 80GB; NVIDIA H100 PCIe"):
        find_hardware("nvidia h100")


def test_unknown_name_lists_known():
    with pytest.raises(UserError, match="unknown hardware 'tpu-v5'; known: H100, .*M2 Max.*this"):
        find_hardware("tpu-v5")


def test_catalogue_rows_complete():
    rows = catalogue()
    kinds = {h.kind for h in rows}
    assert kinds == {"gpu", "apple", "cpu"}
    for h in rows:
        assert h.source and h.memory_gb > 0 and h.bf16_tflops > 0 and h.power_w > 0
        assert h.site in ("datacentre", "desk")
    for chip in ("M1", "M2", "M3", "M4"):
        for tier in ("", " Pro", " Max"):
            find_hardware(chip + tier)


def test_this_machine_without_nvml_is_the_cpu():
    class NoGpu:
        def nvmlInit(self):
            raise RuntimeError("no driver")

    hw = detect_this(NoGpu())
    assert hw.kind == "cpu" and hw.name.startswith("this") and hw.compute_dtype == "fp32"
    assert hw.memory_gb > 0 and hw.peak_flops > 0


def test_this_machine_with_an_h100_matches_the_catalogue():
    class Mem:
        total = 85_520_809_984

    class FakeNvml:
        def nvmlInit(self):
            pass

        def nvmlDeviceGetCount(self):
            return 1

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetName(self, h):
            return b"NVIDIA H100 80GB HBM3"

        def nvmlDeviceGetMemoryInfo(self, h):
            return Mem()

    hw = detect_this(FakeNvml())
    assert hw.kind == "gpu" and hw.bf16_tflops == 989.4 and hw.memory_gb == 85.5
    assert hw.name == "this: NVIDIA H100 80GB HBM3"
