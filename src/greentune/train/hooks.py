"""Extension points of the training loop.

The loop itself only knows batches, loss, AdamW and checkpoints. Each technique that
needs to act during training (ReLoRA merges, MoE router loss and expert statistics, the
energy ledger and its budget) is a `TrainHook`; every method has a no-op default.
"""

from __future__ import annotations

import torch


class TrainHook:
    def on_start(self, step: int) -> None:
        """Called once before the first step (also after a resume, with the resumed step)."""

    def before_step(self, step: int) -> None:
        """Called at the start of 0-based `step`, before its first forward."""

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        """A term added to the loss of the micro-batch `batch` just forwarded (e.g. router aux loss)."""
        return None

    def lr_factor(self, step: int) -> float:
        """Multiplier on the scheduled LR for 0-based `step` (ReLoRA's jagged restarts)."""
        return 1.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        """Called after optimizer.step() of 1-based `step`; returns extra metrics for that step."""
        return {}

    def should_stop(self) -> str | None:
        """A reason to checkpoint and stop now (e.g. energy budget reached), or None."""
        return None

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Extra tensors that a checkpoint must hold for a bit-identical resume."""
        return {}

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `checkpoint_tensors`, called on resume."""

    def on_end(self, step: int) -> None:
        """Called once when the loop ends (finished, stopped or interrupted)."""
