"""Fault injection for the crash tests: `GREENTUNE_FAULT=<point>` SIGKILLs this process at `<point>`.

Points (each checked where the work happens, so a test kills a real run at a real moment):

* `checkpoint-write:N` — halfway through writing the step-N checkpoint;
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
    """SIGKILL this process if `GREENTUNE_FAULT` names `point`."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
