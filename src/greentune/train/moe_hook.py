"""The training loop's MoE hook: router aux loss into the loss, expert use into metrics.

It lives with the loop (like `energy_hook.py`): `moe/` knows experts and routers, not the loop."""

from __future__ import annotations

import torch

from greentune.moe.router import RouterMonitor
from greentune.train.hooks import TrainHook


class MoEHook(TrainHook):
    """Adds `aux_loss_coef · load-balancing loss` per micro-batch; reports expert use per step."""

    def __init__(self, monitor: RouterMonitor):
        self.monitor = monitor

    def before_step(self, step: int) -> None:
        self.monitor.pop_stats()  # drop routing captured outside training (evaluation forwards)

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        loss = self.monitor.pop_aux_loss(batch.get("attention_mask"))
        return loss if self.monitor.aux_loss_coef > 0 else None

    def after_step(self, step: int, optimizer) -> dict:
        return self.monitor.pop_stats()

    def on_end(self, step: int) -> None:
        self.monitor.pop_stats()
