"""Adapters in PEFT's on-disk layout, so transformers, PEFT and vLLM load them.

Files: `adapter_config.json` and `adapter_model.safetensors`. Keys are
`base_model.model.<module path>.lora_A.weight` (rank, in) and `.lora_B.weight`
(out, rank) — PEFT's own names with the adapter name stripped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from greentune.adapters.expert_lora import (
    expert_lora_state_dict,
    load_expert_lora_state_dict,
    target_parameters,
)
from greentune.adapters.lora import lora_modules
from greentune.errors import UserError
from greentune.fsutil import atomic_dir
from greentune.models.loader import check_safetensors_header
from greentune.moe.experts import sparse_experts
from greentune.moe.router import (
    find_routers,
    load_router_state_dict,
    router_modules_to_save,
    router_state_dict,
)

PREFIX = "base_model.model."


def _moe_parts(model: torch.nn.Module) -> tuple[bool, bool]:
    """(has expert LoRA, trains the router) — the two MoE additions to a PEFT adapter."""
    experts = any(m.lora is not None for _, m in sparse_experts(model))
    router = any(p.requires_grad for _, r in find_routers(model) for p in r.parameters())
    return experts, router


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named tensors: every `LoRALinear`, expert LoRA (`target_parameters`) and a trained router."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        sd[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
    experts, router = _moe_parts(model)
    if experts:
        sd.update(expert_lora_state_dict(model))
    if router:
        sd.update(router_state_dict(model))
    return sd


def load_lora_state_dict(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter"
) -> None:
    mods = lora_modules(model)
    seen = set()
    experts, router = _moe_parts(model)
    if experts:
        load_expert_lora_state_dict(model, sd)
        seen |= set(expert_lora_state_dict(model))
    if router:
        load_router_state_dict(model, sd)
        seen |= set(router_state_dict(model))
    for name, m in mods.items():
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            key = f"{PREFIX}{name}.{part}.weight"
            if key not in sd:
                raise UserError(f"{source}: missing tensor {key}")
            if sd[key].shape != param.shape:
                raise UserError(
                    f"{source}: {key} has shape {tuple(sd[key].shape)}, model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(sd[key])
            seen.add(key)
    extra = sorted(set(sd) - seen)
    if extra:
        raise UserError(
            f"{source}: tensors not in this model, e.g. {extra[0]} (was it trained on another base?)"
        )


def adapter_config(model: torch.nn.Module, rank: int, alpha: float, dropout: float, base_model: str) -> dict:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": leaves or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
    }
    experts, router = _moe_parts(model)
    if experts:
        config["target_parameters"] = target_parameters(model)
        config["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout; it only matters in training
    if router:
        config["modules_to_save"] = router_modules_to_save(model)
    return config


def save_adapter(
    model: torch.nn.Module, out_dir: str | Path, rank: int, alpha: float, dropout: float, base_model: str
) -> Path:
    """Write the PEFT folder atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(lora_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(
            json.dumps(adapter_config(model, rank, alpha, dropout, base_model), indent=2) + "\n"
        )
    return out_dir


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(
            f"{adapter_dir}: not a PEFT adapter folder (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg_path}: not valid JSON ({err.msg})") from None
    check_safetensors_header(w_path)
    return config, load_file(str(w_path))


__all__ = ["lora_state_dict", "load_lora_state_dict", "save_adapter", "read_adapter", "adapter_config"]
