import pytest

from greentune.energy.components import Component
from greentune.energy.factors import Factors
from greentune.energy.ledger import Ledger
from greentune.energy.meter import Measurement, Meter
from greentune.train.energy_hook import EnergyHook


class Counter(Component):
    name, source = "cpu", "rapl"

    def __init__(self):
        self.value = 0.0

    def read(self):
        return self.value


def drive(hook, counter, steps, start=0, j_per_step=3.6e5):
    out, stopped = [], None
    hook.on_start(start)
    for step in range(start + 1, start + steps + 1):
        counter.value += j_per_step  # 0.1 kWh per step
        out.append(hook.after_step(step, None))
        stopped = hook.should_stop()
        if stopped:
            break
    hook.on_end(step)
    return out, stopped


def test_intervals_metrics_and_budget_then_resume(tmp_path):
    counter = Counter()
    meter = Meter([counter], poll_interval_s=0, sync=None)
    ledger = Ledger(tmp_path, Factors.for_region("FR"))
    ledger.record(Measurement("load", 0, 1, 1.0, {"cpu": 3.6e5}, {"cpu": "rapl"}))  # 0.1 kWh before training
    hook = EnergyHook(meter, ledger, interval_steps=2, budget_kwh=0.45)
    metrics, stopped = drive(hook, counter, steps=10)
    assert [m["step_joules"] for m in metrics] == [3.6e5] * 4
    assert metrics[-1]["joules"] == pytest.approx(1.44e6)
    assert stopped and "energy budget reached" in stopped
    rows = ledger.rows()
    assert [r["phase"] for r in rows] == ["load", "train", "train"]
    assert [round(r["it_kwh"], 6) for r in rows] == [0.1, 0.2, 0.2]
    state = hook.checkpoint_tensors()

    # --resume with a higher budget: totals and cumulative joules carry on
    hook2 = EnergyHook(meter, Ledger(tmp_path, Factors.for_region("FR")), interval_steps=2, budget_kwh=10)
    hook2.restore_tensors(state)
    metrics2, stopped2 = drive(hook2, counter, steps=3, start=4)
    assert stopped2 is None
    assert metrics2[-1]["joules"] == pytest.approx(1.44e6 + 3 * 3.6e5)
    rows = ledger.rows()
    assert [round(r["it_kwh"], 6) for r in rows] == [
        0.1,
        0.2,
        0.2,
        0.2,
        0.1,
    ]  # step 6 closes one, on_end the tail
    assert ledger.totals()["it_kwh"] == pytest.approx(0.8)
