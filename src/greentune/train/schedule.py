"""Learning-rate schedules as pure functions of the step (nothing to checkpoint).

    warm-up:  lr · (s + 1) / warmup                       for s < warmup
    cosine:   lr · (m + (1 − m) · ½(1 + cos(π · p)))       p = progress after warm-up, m = min_lr_ratio
    linear:   lr · (m + (1 − m) · (1 − p))
    constant: lr

ReLoRA's jagged schedule multiplies this envelope by min(1, (s − r) / restart_warmup)
where r is the last restart step: the LR drops to zero at each merge and re-warms
linearly back onto the envelope.
"""

from __future__ import annotations

import math


def envelope(step: int, lr: float, total: int, warmup: int, schedule: str, min_lr_ratio: float) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def restart_factor(step: int, restart_every: int | None, restart_warmup: int) -> float:
    """ReLoRA's jagged multiplier for 0-based `step`: 0 right after each merge, back to 1 after
    `restart_warmup`."""
    if not restart_every or step < restart_every or restart_warmup <= 0:
        return 1.0
    since = step - (step // restart_every) * restart_every
    return min(1.0, since / restart_warmup)


def lr_at(
    step: int,
    lr: float,
    total: int,
    warmup: int,
    schedule: str,
    min_lr_ratio: float,
    restart_every: int | None = None,
    restart_warmup: int = 0,
) -> float:
    """The LR for 0-based `step`; with `restart_every`, ReLoRA's jagged restarts."""
    return envelope(step, lr, total, warmup, schedule, min_lr_ratio) * restart_factor(
        step, restart_every, restart_warmup
    )
