"""The model catalogue (`data_files/models.yaml`): open base models with their config facts.

`find_model(name)` resolves a catalogue name or alias (case-insensitive, spaces, dashes,
dots and underscores ignored, unique prefix allowed); `model_facts(spec)` turns a catalogue
name, a config.json path or a model directory into `ArchFacts` — no weights, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from greentune.errors import UserError
from greentune.models.facts import ArchFacts, arch_facts


@dataclass(frozen=True)
class CatalogueModel:
    """One catalogue row: `config` holds the config.json keys the planner reads."""

    name: str
    hf: str
    licence: str
    source: str
    params_b: float
    config: dict = field(repr=False)
    active_b: float | None = None
    aliases: tuple[str, ...] = ()
    # the unit (billions) the publisher rounded `active_b` to, where it gives only a rounded
    # figure (Baidu's "A3B"); None: `active_b` is stated to its digits
    active_rounding_b: float | None = None

    def facts(self) -> ArchFacts:
        return arch_facts(dict(self.config))


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(s).lower())


@cache
def models() -> tuple[CatalogueModel, ...]:
    """All catalogue rows, in file order."""
    text = resources.files("greentune").joinpath("data_files/models.yaml").read_text(encoding="utf-8")
    return tuple(
        CatalogueModel(
            name=r["name"],
            hf=r["hf"],
            licence=r["licence"],
            source=r["source"],
            params_b=float(r["params_b"]),
            config=dict(r["config"]),
            active_b=float(r["active_b"]) if r.get("active_b") is not None else None,
            aliases=tuple(str(a) for a in r.get("aliases", [])),
            active_rounding_b=float(r["active_rounding_b"]) if r.get("active_rounding_b") else None,
        )
        for r in yaml.safe_load(text)
    )


def find_model(name: str) -> CatalogueModel | None:
    """The row `name` denotes; None when nothing matches; UserError when several do."""
    q = _norm(name)
    rows = models()
    for test in (lambda k: k == q, lambda k: k.startswith(q)):
        hits = [m for m in rows if any(test(_norm(k)) for k in (m.name, m.hf, *m.aliases))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UserError(f"model {name!r} is ambiguous: {', '.join(m.name for m in hits)}")
    return None


def model_facts(spec: str | Path | dict) -> tuple[ArchFacts, str]:
    """(facts, label) for a catalogue name, a config.json / model directory, or a config dict."""
    if isinstance(spec, dict):
        return arch_facts(spec), str(spec.get("_name_or_path") or spec.get("model_type", "config"))
    p = Path(str(spec)).expanduser()
    if p.exists():
        return arch_facts(p), str(p)
    row = find_model(str(spec))
    if row is None:
        raise UserError(
            f"no model {spec!r}: not a config.json or model directory, and not in the catalogue "
            f"(known: {', '.join(m.name for m in models())}; see --list-models)"
        )
    return row.facts(), row.name


def list_models_table() -> str:
    """The catalogue as a fixed-width table (what `greentune plan --list-models` prints)."""
    lines = [f"{'name':<20} {'params':>8} {'active':>8} {'type':<12} {'licence':<40} hub id"]
    for m in models():
        f = m.facts()
        act = f"{f.active_params / 1e9:.1f}B" if f.is_moe else ""
        lines.append(
            f"{m.name:<20} {f.total_params / 1e9:>7.1f}B {act:>8} {f.model_type:<12} "
            f"{m.licence[:40]:<40} {m.hf}"
        )
    return "\n".join(lines)
