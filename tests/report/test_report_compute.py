"""The report shows the run's compute efficiency: summary.json's, or computed from the metrics."""

from __future__ import annotations

import json

import pytest

from greentune.report import write_report

from .runfixture import make_run  # noqa: TID252 - as test_report.py


def _add_flops(run, fpt=1e6):
    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for m in lines:
        m.update(flops_per_token=fpt, step_seconds=0.5)
    path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    return lines


def test_compute_from_the_summary_is_shown_as_cards(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    summary = json.loads((run / "summary.json").read_text())
    summary["compute"] = {
        "flops_per_token": 1e6,
        "mean_flops_per_s": 2.5e10,
        "peak_flops": 1e11,
        "utilisation": 0.25,
        "peak_source": "test",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    json_path, html_path = write_report(run)
    assert json.loads(json_path.read_text())["training"]["compute"]["utilisation"] == 0.25
    html = html_path.read_text()
    assert 'id="train-flops"' in html and 'id="train-utilisation"' in html and "25.0 %" in html


def test_without_a_summary_the_metrics_give_the_achieved_rate(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    lines = _add_flops(run)
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("compute", None)
    (run / "summary.json").write_text(json.dumps(summary))
    json_path, _ = write_report(run)
    c = json.loads(json_path.read_text())["training"]["compute"]
    by_step = {m["step"]: m for m in lines}  # a step re-run after a resume counts once (its last line)
    work, last = 0.0, 0
    for m in sorted(by_step.values(), key=lambda m: m["step"]):
        work += (m["tokens"] - last) * 1e6
        last = m["tokens"]
    assert c["mean_flops_per_s"] == pytest.approx(work / (0.5 * len(by_step)))
    assert "utilisation" not in c  # no peak without the run's summary
