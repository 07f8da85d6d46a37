import json

import pytest

from greentune.energy.factors import Factors
from greentune.energy.ledger import FIELDS, Ledger
from greentune.energy.meter import Measurement

FR = Factors.for_region("FR", pue=1.1, wue_onsite=0.3)  # grid 56 g/kWh, off-site 0.82 L/kWh


def m(phase, cpu, gpu=None, seconds=10.0, start=1000.0):
    joules = {"cpu": cpu} | ({"gpu:0": gpu} if gpu is not None else {})
    source = {"cpu": "estimate"} | ({"gpu:0": "nvml"} if gpu is not None else {})
    return Measurement(phase, start, start + seconds, seconds, joules, source)


def test_row_arithmetic_by_hand(tmp_path):
    ledger = Ledger(tmp_path, FR)
    row = ledger.record(m("train", 1.8e6, 5.4e6))  # 7.2 MJ = 2 kWh IT
    assert tuple(sorted(row)) == tuple(sorted(FIELDS))
    assert row["it_kwh"] == pytest.approx(2.0)
    assert row["facility_kwh"] == pytest.approx(2.2)  # × PUE 1.1
    assert row["kg_co2e"] == pytest.approx(0.1232)  # 2.2 kWh × 56 g
    assert row["water_l"] == pytest.approx(2.404)  # 2 × 0.3 + 2.2 × 0.82
    assert (row["region"], row["pue"], row["grid_g_per_kwh"]) == ("FR", 1.1, 56.0)
    assert (row["wue_onsite_l_per_kwh"], row["offsite_l_per_kwh"]) == (0.3, 0.82)
    line = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert line == row


def test_phase_override_and_totals(tmp_path):
    ledger = Ledger(tmp_path, FR)
    ledger.record(m("load", 3.6e5))  # 0.1 kWh
    ledger.record(m("w", 7.2e5, 3.6e5), phase="train")  # 0.3 kWh
    ledger.record(m("train", 3.6e5))  # 0.1 kWh
    t = Ledger(tmp_path, FR).totals()  # a new instance: what --resume sees
    assert t["rows"] == 3
    assert t["it_kwh"] == pytest.approx(0.5)
    assert t["facility_kwh"] == pytest.approx(0.55)
    assert t["kg_co2e"] == pytest.approx(0.55 * 0.056)
    assert t["water_l"] == pytest.approx(0.5 * 0.3 + 0.55 * 0.82)
    assert t["seconds"] == pytest.approx(30.0)
    assert t["joules"] == pytest.approx({"cpu": 1.44e6, "gpu:0": 3.6e5})
    assert t["sources"] == {"cpu": ["estimate"], "gpu:0": ["nvml"]}
    assert t["estimate"] is True
    assert t["by_phase"]["train"]["it_kwh"] == pytest.approx(0.4)
    assert t["by_phase"]["load"]["joules"] == pytest.approx(3.6e5)


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path):
    ledger = Ledger(tmp_path, FR)
    ledger.record(m("load", 3.6e6))
    with open(ledger.path, "a") as f:
        f.write('{"phase": "train", "joules": {"cpu": 9')  # SIGKILL mid-write
    assert len(ledger.rows()) == 1
    assert ledger.totals()["it_kwh"] == pytest.approx(1.0)
    resumed = Ledger(tmp_path, FR)  # cuts the torn tail
    resumed.record(m("train", 7.2e6))
    assert [r["phase"] for r in resumed.rows()] == ["load", "train"]
    assert resumed.totals()["it_kwh"] == pytest.approx(3.0)


def test_budget(tmp_path):
    ledger = Ledger(tmp_path, FR)
    assert not ledger.over_budget(None)
    ledger.record(m("train", 3.6e6))  # 1 kWh
    assert not ledger.over_budget(1.5)
    assert ledger.over_budget(1.5, pending_joules=1.8e6)
    assert ledger.over_budget(1.0)
    assert "energy budget reached: 1 kWh IT of 1 kWh" in ledger.budget_message(1.0)


def test_sigkill_while_recording_keeps_complete_rows(tmp_path):
    """A writer killed at a random moment leaves only complete rows; reopening appends cleanly."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys\n"
        "from greentune.energy.factors import Factors\n"
        "from greentune.energy.ledger import Ledger\n"
        "from greentune.energy.meter import Measurement\n"
        "led = Ledger(sys.argv[1], Factors.for_region('FR'))\n"
        "i = 0\n"
        "while True:\n"
        "    led.record(Measurement('train', i, i + 1, 1.0, {'cpu': 3.6e4}, {'cpu': 'estimate'}))\n"
        "    i += 1\n"
        "    if i == 5: print('go', flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ledger = Ledger(tmp_path, FR)
    n = len(ledger.rows())
    assert n >= 5
    assert ledger.totals()["it_kwh"] == pytest.approx(n * 0.01)
    ledger.record(m("train", 3.6e4))
    assert len(ledger.rows()) == n + 1


def test_complete_last_row_without_newline_is_kept(tmp_path):
    ledger = Ledger(tmp_path, FR)
    ledger.record(m("load", 3.6e6))
    ledger.path.write_text(ledger.path.read_text().rstrip("\n"))
    resumed = Ledger(tmp_path, FR)
    resumed.record(m("train", 3.6e6))
    assert [r["phase"] for r in resumed.rows()] == ["load", "train"]
