import subprocess
import sys

import psutil
import pytest

from greentune.energy.estimate import DEFAULT_W_PER_THREAD, EstimateCpu, EstimateDram, cpu_power
from greentune.energy.hardware import describe_hardware
from greentune.energy.nvml import nvml_components


def test_cpu_table_and_default():
    p = cpu_power("AMD EPYC 7763")
    assert p.w_per_thread == pytest.approx(280 / 128) and "280 W TDP / 128 threads" in p.basis
    assert cpu_power("Intel Xeon Platinum 8480+").w_per_thread == pytest.approx(350 / 112)
    d = cpu_power("Some Future CPU")
    assert d.w_per_thread == DEFAULT_W_PER_THREAD == 4.0 and "default 4 W per thread" in d.basis


def test_cpu_estimate_is_cpu_seconds_times_watts():
    cpu = EstimateCpu("self", w_per_thread=10.0)
    t0 = psutil.Process().cpu_times()
    x = 0
    for i in range(1_500_000):
        x += i
    j = cpu.read()
    t1 = psutil.Process().cpu_times()
    used = (t1.user + t1.system) - (t0.user + t0.system)
    assert j == pytest.approx(10.0 * used, abs=10.0 * 0.05)
    assert cpu.read() >= j  # monotone


def test_children_scope_counts_a_finished_child_and_not_self():
    cpu = EstimateCpu("children", w_per_thread=1.0)
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    subprocess.run([sys.executable, "-c", busy], check=True)
    x = 0
    for i in range(500_000):
        x += i  # parent's own work: not counted
    assert 0.29 <= cpu.read() <= 1.5


def test_dram_integrates_rss_over_time():
    clock = [0.0]
    dram = EstimateDram("self", w_per_gib=2.0, clock=lambda: clock[0])
    gib = dram.rss_gib()
    clock[0] = 10.0
    assert dram.read() == pytest.approx(2.0 * gib * 10.0, rel=0.2)


def test_scope_validated():
    with pytest.raises(ValueError, match="scope"):
        EstimateCpu("everyone")


def test_real_nvml_and_hardware_never_raise():
    assert isinstance(nvml_components(), list)  # [] on a machine without NVIDIA driver
    hw = describe_hardware()
    assert hw["logical_cpus"] >= 1 and hw["memory_bytes"] > 0 and isinstance(hw["gpus"], list)
