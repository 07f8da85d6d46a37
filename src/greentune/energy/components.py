"""The one interface every energy source implements: a cumulative counter in joules.

A `Component` is one thing that draws power (a CPU package, DRAM, one GPU). `read()`
returns the joules it has used since the component was created; a meter window is the
difference of two reads. Components that must be sampled between reads (power
integration, counter wrap-around, resident-memory integration) set `needs_polling` and
get `poll()` called by the meter's background thread.

`source` names how the joules were obtained and travels with every number:
``nvml`` (GPU total-energy counter), ``nvml-power`` (GPU power readings integrated over
time), ``rapl`` (Linux powercap counters), ``apple`` (IOReport counters through
zeus-apple-silicon) and ``estimate`` (modelled from CPU time and resident memory).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

SOURCES = ("nvml", "nvml-power", "rapl", "apple", "estimate")


class Component(ABC):
    """A cumulative energy counter in joules.

    Attributes:
        name: the key in `Measurement.joules`, e.g. ``cpu``, ``dram``, ``gpu:0``.
        source: one of `SOURCES`; may change once if a component has to degrade
            (a stuck GPU counter falls back to ``nvml-power``).
        needs_polling: whether `poll()` must run every few seconds between reads.
    """

    name: str = "?"
    source: str = "estimate"
    needs_polling: bool = False

    @abstractmethod
    def read(self) -> float:
        """Joules used since this component was created (monotone non-decreasing)."""

    def poll(self) -> None:
        """Sample between reads (only called when `needs_polling`)."""
        return None  # a deliberate no-op by default: only polled components override it

    def close(self) -> None:
        """Release handles; `read()` must not be called afterwards."""
        return None  # a deliberate no-op by default: components that hold handles override it

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, source={self.source!r})"
