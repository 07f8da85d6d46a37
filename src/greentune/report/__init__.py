"""The run report: `report.json` and a self-contained `report.html` (inline CSS and SVG)."""

from greentune.report.build import build_report, write_report

__all__ = ["build_report", "write_report"]
