"""PyTorch rounding its matmul inputs as llama.cpp's CPU backend does for quantised weights.

ggml multiplies a quantised weight by activations it first quantises to the weight type's
`vec_dot_type`: Q8_0 blocks of 32 (d = fp16(amax/127), q = round(x·127/amax)) for
Q8_0/Q4_0/Q5_0 weights, Q8_K blocks of 256 (q = round(x·(−127/m)) with m the block's
signed largest value, d = 1/scale kept in f32) for the K-quants. Most families absorb that
rounding (row.q_atol); the hybrids' gated delta net does not: q·k of unit vectors that
nearly cancel, per-head RMS-normalised after, turns the 0.5% input rounding into ~1 in
log-probability. `round_activations` makes PyTorch round where llama.cpp does, so a
quantised hybrid GGUF is compared with PyTorch computing the same thing.
"""

from __future__ import annotations

import re

import torch

_Q8_0 = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
_Q8_K = {"Q4_K", "Q5_K", "Q6_K"}
# Linear leaf → the GGUF tensor whose type decides how its input is rounded (delta-net projections)
_DELTA_NET = {
    "in_proj_qkvz": "attn_qkv",
    "in_proj_qkv": "attn_qkv",
    "in_proj_z": "attn_gate",
    "in_proj_ba": "ssm_ba",
    "in_proj_b": "ssm_beta",
    "in_proj_a": "ssm_alpha",
    "out_proj": "ssm_out",
}


def q8_0(x: torch.Tensor) -> torch.Tensor:
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    d = (amax / 127.0).half().float()
    return (torch.round(b * inv) * d).reshape(x.shape)


def q8_k(x: torch.Tensor) -> torch.Tensor:
    b = x.reshape(-1, 256)
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    scale = torch.where(m != 0, -127.0 / torch.where(m != 0, m, 1.0), 0.0)
    q = torch.clamp(torch.round(b * scale), max=127)
    return torch.where(scale != 0, q / torch.where(scale != 0, scale, 1.0), 0.0).reshape(x.shape)


def rounder(ggml_type: str):
    """The activation rounding of a matmul by a `ggml_type` weight (None: f32, unrounded)."""
    if ggml_type in _Q8_0:
        return q8_0
    if ggml_type in _Q8_K:
        return q8_k
    if ggml_type == "F16":
        return lambda x: x.half().float()
    assert ggml_type == "F32", ggml_type
    return None


def _gguf_name(module: str) -> str | None:
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", module)
    if module == "lm_head":
        return "output.weight"
    if not m:
        return None
    b, rest = f"blk.{m.group(1)}", m.group(2)
    leaf = rest.rsplit(".", 1)[-1]
    if rest.startswith("linear_attn."):
        return f"{b}.{_DELTA_NET[leaf]}.weight"
    table = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
        "mlp.shared_expert.up_proj": "ffn_up_shexp",
        "mlp.shared_expert.down_proj": "ffn_down_shexp",
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
        "mlp.gate": "ffn_gate_inp",
    }
    return f"{b}.{table[rest]}.weight"


def _experts_forward(module, gate_up_round, down_round):
    """The HF experts' forward (fused gate_up [E, 2I, H], down [E, H, I]) rounding both inputs."""

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        x = gate_up_round(hidden_states) if gate_up_round else hidden_states
        for e in range(module.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if not len(token):
                continue
            gate, up = torch.nn.functional.linear(x[token], module.gate_up_proj[e]).chunk(2, dim=-1)
            h = module.act_fn(gate) * up
            h = down_round(h) if down_round else h
            y = torch.nn.functional.linear(h, module.down_proj[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y)
        return out

    return forward


def round_activations(model, types: dict[str, str]) -> None:
    """Hook every matmul of `model` (an HF hybrid MoE) to round its input as llama.cpp does for the
    GGUF weight type it runs with (`types`: GGUF tensor name → GGML type name)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fn = rounder(types[_gguf_name(name)])
            if fn is not None:
                module.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]),))
        elif name.endswith(".mlp.experts"):
            b = f"blk.{name.split('.')[2]}"
            if types[f"{b}.ffn_gate_exps.weight"] != types[f"{b}.ffn_up_exps.weight"]:
                raise AssertionError(f"{b}: gate and up experts of different types")
            module.forward = _experts_forward(
                module,
                rounder(types[f"{b}.ffn_gate_exps.weight"]),
                rounder(types[f"{b}.ffn_down_exps.weight"]),
            )
