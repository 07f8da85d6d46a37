import io
import json
import sys

import pytest

from greentune.energy.command import run_meter
from greentune.errors import UserError


def test_exit_code_passthrough_and_text_bill():
    out = io.StringIO()
    code = run_meter([sys.executable, "-c", "import sys; sys.exit(3)"], region="FR", as_json=False, out=out)
    assert code == 3
    text = out.getvalue()
    for needle in (
        "kWh IT (estimate)",
        "kWh facility (PUE 1.58)",
        "kgCO2e (estimate) (France, 56 gCO2e/kWh)",
        " L (estimate)",
        "cpu ",
        "(estimate)",
        "time ",
    ):
        assert needle in text, needle


def test_json_bill_and_child_cpu_time_is_counted():
    out = io.StringIO()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    code = run_meter([sys.executable, "-c", busy], region=None, as_json=True, out=out)
    assert code == 0
    doc = json.loads(out.getvalue())
    assert doc["exit_code"] == 0 and doc["region"] == "WORLD" and doc["estimate"] is True
    assert doc["source"]["cpu"] == "estimate"
    # >= 0.3 s of child CPU at the stated W per thread (4 W default on an unlisted CPU)
    from greentune.energy.estimate import cpu_power

    assert doc["joules"]["cpu"] >= 0.29 * cpu_power().w_per_thread
    assert doc["it_kwh"] == pytest.approx(sum(doc["joules"].values()) / 3.6e6)


def test_signal_exit_code():
    code = run_meter(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], out=io.StringIO()
    )
    assert code == 128 + 15


def test_missing_or_unknown_command():
    with pytest.raises(UserError, match="nothing to meter"):
        run_meter([], out=io.StringIO())
    with pytest.raises(UserError, match="command not found: no-such-command-xyz"):
        run_meter(["no-such-command-xyz"], out=io.StringIO())
    with pytest.raises(UserError, match="unknown energy.region"):
        run_meter([sys.executable, "-c", "pass"], region="XX", out=io.StringIO())
