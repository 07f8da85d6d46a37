"""Energy, carbon and water: meters (NVML, RAPL, Apple, estimate), factors, the run ledger,
measured savings and `greentune meter`.

Typical use in a pipeline::

    from greentune.energy import Factors, Ledger, Meter
    meter = Meter.auto()
    ledger = Ledger(run_dir, Factors.for_region("FR", pue=1.1))
    with meter.phase("load") as w:
        ...
    ledger.record(w.result)
"""

from greentune.energy.factors import Factors
from greentune.energy.hardware import describe_hardware
from greentune.energy.ledger import FIELDS, Ledger, bill, sum_rows
from greentune.energy.meter import Measurement, Meter, Window

__all__ = [
    "FIELDS",
    "Factors",
    "Ledger",
    "Measurement",
    "Meter",
    "Window",
    "bill",
    "describe_hardware",
    "sum_rows",
]
