"""The one completeness rule for a loaded checkpoint, shared by the fp32 and the quantised loader.

A checkpoint must provide every weight the architecture has, nothing the architecture lacks,
and each in the architecture's shape; otherwise the missing weights would silently stay at
random initialisation (a model that trains and evaluates, with perplexity ≈ vocabulary
size). What does *not* count: a tied ``lm_head`` the checkpoint omits (it reads the
embedding), buffers the model computes itself (rotary ``inv_freq``, which are not persistent
and so never appear in the expected names), and checkpoint tensors transformers' own
``_keys_to_ignore_on_load_unexpected`` patterns name (e.g. old checkpoints' saved ``inv_freq``).
"""
from __future__ import annotations

import re
from typing import Iterable

from ..errors import UserError

ALWAYS_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$",)


def ignorable_unexpected(model) -> list[str]:
    """Regex patterns of checkpoint tensors the model deliberately does not load."""
    patterns = list(ALWAYS_IGNORED_UNEXPECTED)
    for attr in ("_keys_to_ignore_on_load_unexpected",):
        patterns += list(getattr(model, attr, None) or [])
    return patterns


def _sample(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def require_complete(where, missing: Iterable[str], unexpected: Iterable[str] = (),
                     mismatched: Iterable[tuple[str, tuple, tuple]] = (), *, expected_count: int | None = None,
                     ignore_unexpected: Iterable[str] = ()) -> None:
    """Raise one `UserError` line naming a few missing / unexpected / mis-shaped tensors and their counts.

    `mismatched`: (name, checkpoint shape, model shape). `ignore_unexpected`: regex patterns.
    """
    patterns = [re.compile(p) for p in ignore_unexpected]
    missing = sorted(set(missing))
    unexpected = sorted(k for k in set(unexpected) if not any(p.search(k) for p in patterns))
    mismatched = sorted(mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        of = f" of {expected_count}" if expected_count else ""
        parts.append(f"{len(missing)}{of} weights missing (e.g. {_sample(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the architecture does not have (e.g. {_sample(unexpected)})")
    if mismatched:
        name, got, want = mismatched[0]
        more = f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        parts.append(f"{len(mismatched)} of the wrong shape (e.g. {name}: checkpoint {tuple(got)}, "
                     f"model {tuple(want)}{more})")
    raise UserError(f"checkpoint {where} does not match its architecture: {'; '.join(parts)}")
