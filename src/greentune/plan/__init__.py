"""Predict memory, time, energy, carbon and water of each fine-tuning technique before a run.

    from greentune.plan import plan
    result = plan("mixtral-8x7b", tokens=100_000_000, hardware="H100", power_cap_w=1000, deadline_h=10)
    result.recommended, result.get("qlora-q4_k").facility_kwh

Files: `hardware.py` (catalogue, this machine), `catalogue.py` (models), `cost.py` (the
cost model and its maths), `recommend.py` (candidates, the cheapest that fits),
`calibrate.py` (measured utilisation and power), `command.py` (`greentune plan`),
`seed_claim.py` (the Mixtral 8x7B worked example).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plan(model: Any, **kwargs):
    """Plan every candidate technique for `model`: a catalogue name, a config.json or model
    folder, a config dict, or `ArchFacts`. Keyword arguments: see `greentune.plan.recommend.plan`."""
    from greentune.models.facts import ArchFacts
    from greentune.plan.catalogue import model_facts
    from greentune.plan.recommend import plan as _plan

    if isinstance(model, ArchFacts):
        facts, label = model, model.model_type
    else:
        facts, label = model_facts(model if isinstance(model, (dict, Path)) else str(model))
    kwargs.setdefault("model", label)
    return _plan(facts, **kwargs)


__all__ = ["plan"]
