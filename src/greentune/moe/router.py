"""MoE routers: freezing, the load-balancing auxiliary loss, and expert-use statistics.

A transformers-v5 router (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, …) is the `gate`
submodule beside `experts`; its forward returns ``(router_logits [N, E], top_k_weights [N, k],
top_k_index [N, k])``. `RouterMonitor` puts a forward hook on each router and keeps what it
returns, so the loss and the statistics need no `output_router_logits=True`.

Load-balancing loss (Switch Transformer eqs. 4–6, as transformers' `load_balancing_loss_func`
computes it, over the rows of all layers together): with p = softmax(logits) per row,

    f_e = (# top-k slots routed to e) / rows          (Σ_e f_e = k)
    P_e = (Σ_rows p_e) / rows
    loss = E · Σ_e f_e · P_e                          (= k when routing is perfectly uniform)

Padding rows are left out when an attention mask [B, T] is given. The loss enters training as
``aux_loss_coef · loss`` (gradient through P only; f is a count).

Expert use per layer, over the forwards since the last `pop_stats()`: the fraction of token-slots
each expert received (sums to 1) and its entropy in nats (ln E = perfectly even, 0 = one expert).

Router training: a router is an [E, H] matrix (E·H parameters, 32 k per Mixtral-8x7B layer),
so it is trained in full when asked (`set_router_trainable_`); a LoRA on it would save nothing.
A trained router is saved as PEFT saves `modules_to_save=["mlp.gate"]`: key
``base_model.model.<router path>.weight`` (`router_state_dict`, `router_modules_to_save`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from greentune.errors import UserError
from greentune.moe.router_grouped import is_sigmoid_router, sigmoid_balancing_loss


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, router) of every MoE router: the `gate` sibling of an `experts` module, or its
    `router` sibling (gpt-oss, GraniteMoE, PhiMoE)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        for attr in ("gate", "router"):
            gate = getattr(module, attr, None)
            if isinstance(gate, nn.Module):
                found.append((f"{name}.{attr}" if name else attr, gate))
                break
    return found


def set_router_trainable_(model: nn.Module, trainable: bool) -> int:
    """Set requires_grad on every router's parameters; returns how many parameters that covers."""
    routers = find_routers(model)
    if trainable and not routers:
        raise UserError("moe router training was asked for, but this model has no MoE router")
    n = 0
    for _, r in routers:
        for p in r.parameters():
            p.requires_grad_(trainable)
            n += p.numel()
    return n


def router_modules_to_save(model: nn.Module) -> list[str]:
    """PEFT `modules_to_save` entries naming the routers, e.g. ``["mlp.gate"]`` (suffix match)."""
    return sorted({".".join(n.split(".")[-2:]) for n, _ in find_routers(model)})


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router weights under PEFT's modules_to_save key names (detached, contiguous, CPU)."""
    return {
        f"base_model.model.{n}.{k}": v.detach().contiguous().cpu()
        for n, r in find_routers(model)
        for k, v in r.state_dict().items()
    }


@torch.no_grad()
def load_router_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> int:
    """Copy router weights saved by `router_state_dict` (or PEFT) into `model`; returns the count.
    Raises UserError when one is missing or has another shape."""
    n = 0
    for name, r in find_routers(model):
        for k, v in r.state_dict().items():
            key = f"base_model.model.{name}.{k}"
            if key not in sd:
                raise UserError(f"adapter has no router tensor {key}")
            if sd[key].shape != v.shape:
                raise UserError(
                    f"adapter tensor {key} has shape {tuple(sd[key].shape)}, expected {tuple(v.shape)}"
                )
            getattr(r, k).copy_(sd[key])
            n += 1
    return n


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E · Σ_e f_e · P_e over the rows of all layers (see module docstring).

    router_logits: one [N, E] tensor per layer (N = B·T rows); attention_mask: [B, T] (1 = real
    token) or None. Returns a 0-dim float32 tensor; 0 when there are no logits.
    """
    if not router_logits:
        return torch.zeros(())
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.to(device).float(), dim=-1)  # [N, E]
        top = torch.topk(probs, top_k, dim=-1).indices  # [N, k]
        if mask is None:
            counts = counts + torch.bincount(top.reshape(-1), minlength=num_experts).float()
            prob_sum = prob_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            counts = counts.scatter_add(0, top.reshape(-1), mask.repeat_interleave(top_k))
            prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
            rows = rows + mask.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # older torch: no way to tell; count every call
        return False


def _layer_key(name: str, ordinal: int) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    return m.group(1) if m else str(ordinal)


class RouterMonitor:
    """Hooks on every router: aux loss per forward, expert-use statistics per step.

    Typical use in a training step::

        mon = RouterMonitor(model, aux_loss_coef=0.01)
        out = model(input_ids, attention_mask=mask)
        loss = out.loss + mon.pop_aux_loss(mask)    # coef · loss; also accumulates the statistics
        ...
        metrics.update(mon.pop_stats())             # once per optimiser step
        mon.close()                                 # at the end (removes the hooks)

    The captured logits keep their graph only while grad is enabled and aux_loss_coef > 0.
    """

    def __init__(self, model: nn.Module, aux_loss_coef: float = 0.0):
        if aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {aux_loss_coef}")
        self.aux_loss_coef = aux_loss_coef
        self.routers = find_routers(model)
        self.keys = [_layer_key(n, i) for i, (n, _) in enumerate(self.routers)]
        self.num_experts = self.top_k = 0
        self.sigmoid = False  # DeepSeek-V3 / GLM-4.5 routers: their own balance loss (router_grouped)
        if self.routers:
            r = self.routers[0][1]
            self.num_experts = int(getattr(r, "num_experts", 0) or r.weight.shape[0])
            self.top_k = int(getattr(r, "top_k", 0))
            self.sigmoid = is_sigmoid_router(r)
        self._logits: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._indices: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._counts: list[torch.Tensor | None] = [None for _ in self.routers]
        self._handles = [r.register_forward_hook(self._hook(i)) for i, (_, r) in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(module, args, output):
            if _in_backward():  # activation checkpointing re-runs the router: count it once
                return
            if not (isinstance(output, tuple) and len(output) == 3):
                return  # not a (logits, weights, indices) router
            logits, _, indices = output
            keep_graph = self.aux_loss_coef > 0 and torch.is_grad_enabled()
            self._logits[i].append(logits if keep_graph else logits.detach())
            self._indices[i].append(indices.detach())
            if not self.top_k:
                self.top_k = indices.shape[-1]

        return hook

    def pop_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """aux_loss_coef · load-balancing loss of the forwards since the last call (0-dim tensor),
        accumulating the expert-use counts (padding left out when `attention_mask` is given).

        With several forwards captured, pass no mask (rows of every forward count)."""
        logits = [t for per_layer in self._logits for t in per_layer]
        chosen = [t for per_layer in self._indices for t in per_layer]
        if attention_mask is not None and any(len(x) > 1 for x in self._logits):
            raise ValueError(
                "pop_aux_loss got an attention mask but several forwards were captured; "
                "call it after each forward"
            )
        for i, per_layer in enumerate(self._indices):
            for idx in per_layer:
                flat = idx.reshape(-1)
                w = (
                    None
                    if attention_mask is None
                    else attention_mask.reshape(-1)
                    .to(idx.device, torch.float32)
                    .repeat_interleave(idx.shape[-1])
                )
                c = torch.bincount(flat, weights=w, minlength=self.num_experts).float()
                self._counts[i] = c if self._counts[i] is None else self._counts[i] + c
        if self.aux_loss_coef > 0 and logits and self.sigmoid:
            loss = self.aux_loss_coef * sigmoid_balancing_loss(
                logits, chosen, self.num_experts, attention_mask
            )
        elif self.aux_loss_coef > 0 and logits:
            loss = self.aux_loss_coef * load_balancing_loss(
                logits, self.num_experts, self.top_k, attention_mask
            )
        else:
            loss = torch.zeros((), device=logits[0].device if logits else None)
        self._logits = [[] for _ in self.routers]
        self._indices = [[] for _ in self.routers]
        return loss

    def pop_stats(self) -> dict[str, dict[str, list[float] | float]]:
        """{"expert_use": {layer: [fraction per expert]}, "expert_entropy": {layer: nats}} since the
        last call, then reset. Forwards not yet popped by `pop_aux_loss` are counted too."""
        if any(self._indices):
            self._drain()
        use, entropy = {}, {}
        present = [(key, c) for key, c in zip(self.keys, self._counts) if c is not None]
        # one host read for all layers (a device sync on an accelerator), not two per layer
        if present:
            counts = torch.stack([c for _, c in present])
            sums = counts.sum(1, keepdim=True)  # whole token counts: exact in float32
            rows = torch.cat([sums, counts / sums], 1).tolist()
        for (key, _), (total, *frac) in zip(present, rows if present else []):
            if total == 0:
                continue
            use[key] = [round(f, 6) for f in frac]
            entropy[key] = round(-sum(f * math.log(f) for f in frac if f > 0), 6)
        self._counts = [None for _ in self.routers]
        return {"expert_use": use, "expert_entropy": entropy}

    def _drain(self) -> None:
        """Count the captured forwards into the statistics without computing a loss."""
        coef, self.aux_loss_coef = self.aux_loss_coef, 0.0
        try:
            self.pop_aux_loss()
        finally:
            self.aux_loss_coef = coef

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._logits = [[] for _ in self.routers]
        self._indices = [[] for _ in self.routers]
