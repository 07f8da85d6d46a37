import json
import os
import re
import shutil
import subprocess

import pytest
from runfixture import make_run

from greentune.errors import UserError
from greentune.report import build_report, write_report
from greentune.report.svg import fmt


def test_report_json_totals_series_and_labels(tmp_path):
    exp = make_run(tmp_path / "run")
    json_path, html_path = write_report(tmp_path / "run")
    r = json.loads(json_path.read_text())
    t = r["totals"]
    for k in ("it_kwh", "facility_kwh", "kg_co2e", "water_l"):
        assert t[k] == pytest.approx(exp[k]), k
    assert r["estimate"] is True
    assert [p["phase"] for p in r["phases"]] == ["load", "quantise", "train", "merge", "export"]
    assert r["phases"][2]["it_kwh"] == pytest.approx(exp["train_kwh"])
    assert len(r["series"]["loss"]) == exp["steps"]  # the duplicated last step is kept once
    assert r["series"]["loss"][-1] == [exp["steps"], 2.5]
    assert [p[0] for p in r["series"]["eval_loss"]] == [20, 40, 60]
    assert r["series"]["cumulative_kwh"][-1][1] == pytest.approx(exp["train_kwh"])
    assert r["training"]["j_per_token"] == pytest.approx(1800.0 / 1024)
    assert r["expert_use"]["0"] == [0.4, 0.3, 0.2, 0.1]
    assert r["factors"]["sources"]["pue"] == "recipe" and r["factors"]["sources"][
        "grid_g_per_kwh"
    ].startswith("Ember")
    assert r["savings"]["rows"][0]["method"] == "full fine-tune estimated from 3 measured steps"
    assert r["hardware"]["recorded_by"] == "the run (summary.json)"
    html = html_path.read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html.split("<h2>Factors</h2>")[0]  # citations in tables only, nothing loaded
    for chart in ("chart-loss", "chart-phases", "chart-cumulative-kwh", "chart-expert-use"):
        assert f'id="{chart}"' in html
    assert html.count('class="est"') >= 5


def test_minimal_run_without_extras(tmp_path):
    make_run(tmp_path / "run", with_extras=False)
    (tmp_path / "run" / "recipe.yaml").unlink()
    r = build_report(tmp_path / "run")
    assert r["savings"] is None and r["recipe"] is None
    assert r["hardware"]["recorded_by"].startswith("the machine that wrote this report")
    _, html = write_report(tmp_path / "run")
    assert 'id="savings-none"' in html.read_text()


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="no run directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(UserError, match="not a greentune run directory"):
        write_report(tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(args, tmp_path, timeout=90):
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (./setup.sh --test installs Debian's chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    exp = make_run(tmp_path / "run")
    json_path, html_path = write_report(tmp_path / "run")
    totals = json.loads(json_path.read_text())["totals"]
    url = html_path.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for chart in ("chart-loss", "chart-phases", "chart-cumulative-kwh", "chart-expert-use"):
        assert re.search(rf'<svg[^>]*id="{chart}"', page), chart
    assert page.count("<path") >= 3  # train loss, eval loss, cumulative kWh
    assert len(re.findall(r'class="bar"', page)) == 5  # five phases
    shown = {
        "it_kwh": (1e3, "Wh"),
        "facility_kwh": (1e3, "Wh"),
        "kg_co2e": (1e3, "gCO2e"),
        "water_l": (1e3, "mL"),
    }
    for key, (mult, unit) in shown.items():
        assert totals[key] == pytest.approx(exp[key])
        assert f'<div class="v">{fmt(totals[key] * mult)} {unit}<span class="est">' in page, (
            key
        )  # totals on the page
    assert "full fine-tune estimated from 3 measured steps" in page
    assert "estimate" in page
    png = tmp_path / "report.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1100,2600", "--hide-scrollbars", url], tmp_path)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    assert png.stat().st_size > 20_000  # a rendered page, not a blank one
    keep = os.environ.get("GREENTUNE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(png, keep)
