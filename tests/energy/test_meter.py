import logging

import pytest

from greentune.energy.components import Component
from greentune.energy.meter import Measurement, Meter, WindowState


class Counter(Component):
    def __init__(self, name, source="rapl"):
        self.name, self.source, self.value = name, source, 0.0

    def read(self):
        return self.value


class Tick:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_meter():
    cpu, gpu, clock = Counter("cpu"), Counter("gpu:0", "nvml"), Tick()
    meter = Meter([cpu, gpu], poll_interval_s=0, sync=None, clock=clock, wall=lambda: 1_700_000_000 + clock.t)
    return meter, cpu, gpu, clock


def test_nested_windows_each_measure_their_own_span():
    meter, cpu, gpu, clock = make_meter()
    with meter.phase("train") as outer:
        cpu.value += 10
        clock.t += 1
        with meter.phase("step") as inner:
            cpu.value += 3
            gpu.value += 7
            clock.t += 2
        cpu.value += 1
        clock.t += 1
    assert inner.result == Measurement(
        "step",
        1_700_000_001.0,
        1_700_000_003.0,
        2.0,
        {"cpu": 3.0, "gpu:0": 7.0},
        {"cpu": "rapl", "gpu:0": "nvml"},
    )
    o = outer.result
    assert (o.phase, o.seconds, o.joules, o.total_joules) == ("train", 4.0, {"cpu": 14.0, "gpu:0": 7.0}, 21.0)
    assert not o.is_estimate


def test_window_states_are_guarded():
    meter, *_ = make_meter()
    w = meter.start("load")
    assert w.state is WindowState.OPEN
    with pytest.raises(RuntimeError, match="expected state CLOSED, got OPEN"):
        _ = w.result
    w.end()
    with pytest.raises(RuntimeError, match="expected state OPEN, got CLOSED"):
        w.end()


def test_window_closed_when_block_raises():
    meter, cpu, _, clock = make_meter()
    with pytest.raises(ValueError):
        with meter.phase("export") as w:
            cpu.value += 5
            raise ValueError("boom")
    assert w.result.joules["cpu"] == 5.0


def test_zero_reading_over_a_long_window_warns(caplog):
    meter, cpu, gpu, clock = make_meter()
    with caplog.at_level(logging.WARNING):
        with meter.phase("train"):
            cpu.value += 1
            clock.t += 5
    assert "gpu:0 (nvml) read 0 J" in caplog.text


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="unique"):
        Meter([Counter("cpu"), Counter("cpu")], poll_interval_s=0)


def test_auto_falls_back_to_estimate_and_measures_cpu_time(tmp_path):
    from tests.energy.fakes import FakeNvml

    nvml = FakeNvml(energy_mj=[], power_mw=[])
    meter = Meter.auto(powercap_root=tmp_path, pynvml=nvml, apple_module=None, poll_interval_s=0.05)
    try:
        assert meter.sources() == {"cpu": "estimate", "dram": "estimate"}
        with meter.phase("busy") as w:
            x = 0
            for i in range(2_000_000):
                x += i
        m = w.result
        assert m.is_estimate and m.joules["cpu"] > 0 and m.joules["dram"] > 0
    finally:
        meter.close()


def test_auto_prefers_rapl_and_nvml(tmp_path):
    from tests.energy.fakes import FakeNvml, make_zone

    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    nvml = FakeNvml(energy_mj=[[0, 1000]], power_mw=[[1]])
    meter = Meter.auto(powercap_root=tmp_path, pynvml=nvml, poll_interval_s=0)
    assert meter.sources() == {"gpu:0": "nvml", "cpu": "rapl"}
    meter.close()


def test_apple_reader_when_importable(tmp_path):
    from types import SimpleNamespace

    class Monitor:
        n = 0

        def begin_window(self, key):
            pass

        def end_window(self, key):
            Monitor.n += 1
            return SimpleNamespace(
                cpu_total_mj=1000.0, dram_mj=200.0, gpu_mj=500.0, gpu_sram_mj=10.0, ane_mj=None
            )

    module = SimpleNamespace(AppleEnergyMonitor=Monitor)
    meter = Meter.auto(
        powercap_root=tmp_path / "none", pynvml=None, gpus=False, apple_module=module, poll_interval_s=0
    )
    assert meter.sources() == {"cpu": "apple", "dram": "apple", "gpu": "apple"}
    with meter.phase("w") as w:
        pass
    meter.close()
    # every component read closes and reopens the zeus window; three reads per snapshot
    assert w.result.joules == pytest.approx({"cpu": 3.0, "dram": 0.6, "gpu": 1.53})


def test_a_failing_sensor_holds_its_last_value_and_warns_once(caplog):
    meter, cpu, gpu, clock = make_meter()
    gpu.value = 5.0
    with caplog.at_level(logging.WARNING):
        with meter.phase("w") as w:
            gpu.value = 7.0
            meter.read()
            gpu.read = lambda: (_ for _ in ()).throw(OSError("GPU is lost"))
            meter.read()
            cpu.value += 1
    assert w.result.joules == {"cpu": 1.0, "gpu:0": 2.0}
    assert caplog.text.count("could not be read") == 1
