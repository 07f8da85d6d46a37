"""greentune: fine-tune pretrained open LLMs on one modest machine, ship them small, and
account for the energy, carbon and water every step cost and saved.

The Python API mirrors the CLI::

    import greentune
    result = greentune.train("recipe.yaml")            # greentune train
    greentune.evaluate("runs/x", "held_out.jsonl")     # greentune eval
    greentune.report("runs/x")                         # greentune report
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(recipe, run_dir=None, resume=False, progress=True):
    """Run a recipe (path or `Recipe`) end to end; see `greentune.pipeline.train`."""
    from greentune.pipeline import train as _train

    return _train(recipe, run_dir=run_dir, resume=resume, progress=progress)


def evaluate(target, data, max_seq_len=None, batch_size=8) -> dict:
    """Perplexity and tokens/s of a run dir or model folder on a data file."""
    from greentune.evaluate import evaluate_path

    return evaluate_path(target, data, max_seq_len=max_seq_len, batch_size=batch_size)


def report(run_dir):
    """Write report.json and report.html for a run dir; returns both paths."""
    from greentune.report import write_report

    return write_report(run_dir)


def demo(out_dir="runs/demo", quick=False) -> dict:
    """The whole pipeline on a built-in small model and real text."""
    from pathlib import Path

    from greentune.demo.run import run_demo

    return run_demo(out_dir=Path(out_dir), quick=quick)
