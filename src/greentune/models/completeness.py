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
from collections.abc import Iterable

from greentune.errors import UserError

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


def require_complete(
    where,
    missing: Iterable[str],
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, tuple, tuple]] = (),
    *,
    expected_count: int | None = None,
    ignore_unexpected: Iterable[str] = (),
) -> None:
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
        parts.append(
            f"{len(mismatched)} of the wrong shape (e.g. {name}: checkpoint {tuple(got)}, "
            f"model {tuple(want)}{more})"
        )
    raise UserError(f"checkpoint {where} does not match its architecture: {'; '.join(parts)}")


def check_headers_against_architecture(where, config, headers: dict[str, tuple]) -> None:
    """The same rule, from the safetensors headers alone (`headers`: checkpoint name → shape),
    before any weight is read: the architecture is built on the meta device from `config`, and
    checkpoint names go through transformers' own renamings (e.g. Mixtral's
    ``block_sparse_moe`` → ``mlp``). A name a fusing converter consumes (per-expert pieces) is
    checked for presence, not shape; the loaders check those after the load."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError):  # an architecture transformers cannot build: the loader says so
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    rename = _renamer(model, expected)
    seen, unexpected, mismatched = set(), [], []
    for name, shape in headers.items():
        target, fused = rename(name)
        if target not in expected:
            unexpected.append(name)
            continue
        seen.add(target)
        if not fused and tuple(shape) != expected[target]:
            mismatched.append((target, tuple(shape), expected[target]))
    missing = set(expected) - seen - tied
    require_complete(
        where,
        missing,
        unexpected,
        mismatched,
        expected_count=len(expected),
        ignore_unexpected=ignorable_unexpected(model),
    )


def _renamer(model, expected: dict):
    """name → (model name, whether a fusing converter consumes it), as `from_pretrained` renames."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - older transformers: keys are module names
        return lambda name: (name, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    meta = {k: True for k in expected}

    def rename(name: str):
        target, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        return target, pattern is not None

    return rename
