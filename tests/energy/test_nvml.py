import logging

import pytest
from fakes import FakeClock, FakeNvml

from greentune.energy.nvml import nvml_components


def test_counter_path_reads_differences_in_millijoules():
    nvml = FakeNvml(energy_mj=[[5_000_000, 5_001_500, 5_004_000]], power_mw=[[100_000]])
    clock = FakeClock()
    (gpu,) = nvml_components(nvml, clock=clock)
    assert gpu.name == "gpu:0" and gpu.source == "nvml"
    clock.t += 1
    assert gpu.read() == pytest.approx(1.5)
    clock.t += 1
    assert gpu.read() == pytest.approx(4.0)
    assert gpu.source == "nvml"


def test_missing_counter_integrates_power():
    nvml = FakeNvml(energy_mj=[None], power_mw=[[100_000, 100_000, 200_000, 200_000]])
    clock = FakeClock()
    (gpu,) = nvml_components(nvml, clock=clock)  # first power sample: 100 W at t=100
    assert gpu.source == "nvml-power"
    clock.t += 2
    assert gpu.read() == pytest.approx(200.0)  # (100+100)/2 W * 2 s
    clock.t += 1
    assert gpu.read() == pytest.approx(350.0)  # + (100+200)/2 W * 1 s
    clock.t += 0.5
    gpu.poll()
    assert gpu.read() == pytest.approx(450.0)  # + 200 W * 0.5 s (poll) + 0 s


def test_missing_counter_with_meter_thread():
    import time

    from greentune.energy.meter import Meter

    nvml = FakeNvml(energy_mj=[None], power_mw=[[50_000]])
    meter = Meter(nvml_components(nvml), poll_interval_s=0.01, sync=None)
    with meter.phase("w") as w:
        time.sleep(0.2)
    meter.close()
    m = w.result
    assert m.source == {"gpu:0": "nvml-power"}
    assert m.joules["gpu:0"] == pytest.approx(50.0 * m.seconds, rel=0.05)


def test_stuck_zero_counter_falls_back_to_power_never_zero(caplog):
    nvml = FakeNvml(energy_mj=[[0]], power_mw=[[80_000]])
    clock = FakeClock()
    (gpu,) = nvml_components(nvml, clock=clock)
    assert gpu.source == "nvml"
    clock.t += 1
    assert gpu.read() == 0.0  # not stuck yet
    with caplog.at_level(logging.WARNING):
        clock.t += 1.5
        gpu.read()  # 2.5 s without movement at 80 W
    assert gpu.source == "nvml-power"
    assert "nvml-power" in caplog.text
    clock.t += 1
    assert gpu.read() == pytest.approx(80.0)


def test_gpu_with_nothing_readable_is_left_out_with_a_warning(caplog):
    nvml = FakeNvml(energy_mj=[None, [0, 1000]], power_mw=[None, [1]])
    with caplog.at_level(logging.WARNING):
        comps = nvml_components(nvml)
    assert [c.name for c in comps] == ["gpu:1"]
    assert "GPU 0" in caplog.text and "NOT measured" in caplog.text


def test_no_nvml_library():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    assert nvml_components(Broken([None], [None])) == []
