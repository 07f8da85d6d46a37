"""Fault injection for the crash tests: `GREENTUNE_FAULT=<point>[@SIGNAL]` sends this process
SIGNAL (default SIGKILL) at `<point>`.

Points (each checked where the work happens, so a test kills a real run at a real moment):

* `checkpoint-write:N` — halfway through writing the step-N checkpoint;
* `step:N` — at the start of (1-based) training step N, e.g. `step:3@SIGTERM` is a
  scheduler's stop request during step 3, `step:2@SIGSTOP` freezes a trainer mid-run;
* `phase:NAME` — at the start of the metered phase NAME (load, quantise, adapt, eval, merge, export);
* `write:NAME` — after the temp file or folder of NAME (e.g. `merged`, `model-q8_0.gguf`,
  `report.html`) is written, before the rename that publishes it.

Unset (the normal case) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "GREENTUNE_FAULT"


def maybe_fault(point: str) -> None:
    """Signal this process if `GREENTUNE_FAULT` names `point`."""
    value = os.environ.get(FAULT_ENV)
    if value is None:
        return
    where, _, name = value.partition("@")
    if where == point:
        os.kill(os.getpid(), signal.Signals[name or "SIGKILL"])
