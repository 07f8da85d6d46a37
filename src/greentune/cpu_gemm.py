"""fp32 GEMMs on the CPU through oneDNN, the kernel library PyTorch bundles.

PyTorch's CPU build sends fp32 `mm`/`linear` to MKL's sgemm and calls oneDNN only for reduced
precision (bf16, fp16, tf32-style). On this project's AMD EPYC machines MKL's sgemm is the slower
of the two: measured (2-core EPYC VM, torch 2.13, 2026-12-02, median of 20) on the shapes a
LoRA step runs, forward x Wᵀ and backward dy W,

    [256, 512] × [512, 2048]     MKL 129 / 150 GFLOP/s   oneDNN 176 / 170
    [1024, 512] × [512, 512]     MKL 152 / 154           oneDNN 182 / 185
    [512, 512] × [512, 8192]     MKL 114 / 176           oneDNN 198 / 193
    [284, 1024] × [1024, 512]    MKL 180 / 112           oneDNN 179 / 184

while below ~2^23 multiply-adds oneDNN's fixed cost per call (~11 µs) loses: [16, 64] × [64, 64]
MKL 5 µs / oneDNN 16 µs, [64, 256] × [256, 256] 59 / 59 µs, [64, 256] × [256, 512] 129 / 104
µs, [256, 256] × [256, 256] 196 / 179 µs. So the frozen-weight GEMMs of training (LoRA bases,
experts, the fused lm_head) from `MIN_MACS` multiply-adds up (2^24, a little above break-even)
call oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op PyTorch's own compiler
emits for CPU linears) on plain strided tensors: no weight copies, no layout change. It has no
autograd, so it is used inside autograd functions (`FrozenLinear` here, `moe.expert_loop`,
`train.fused_head_ce`). Results differ from MKL's by float rounding only (another summation
order); both are deterministic, so a resumed run stays bit-identical.

`BACKEND` ("auto" by default, or ``GREENTUNE_CPU_GEMM=onednn|torch``) picks it: auto uses oneDNN
on AMD x86-64 CPUs (where it was measured; MKL is Intel's own library and tuned for Intel's
CPUs, and an Apple or other ARM CPU has its own BLAS), `onednn` on any CPU, each where this
build has the op and it passes a self-check; `torch` keeps PyTorch's own choice everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKEND = os.environ.get("GREENTUNE_CPU_GEMM", "auto").strip().lower()  # auto | onednn | torch
MIN_MACS = 1 << 24  # multiply-adds from which a GEMM goes to oneDNN (see the module docstring)
if BACKEND not in ("auto", "onednn", "torch"):
    log.warning("GREENTUNE_CPU_GEMM=%r is not auto, onednn or torch; using auto", BACKEND)
    BACKEND = "auto"


@functools.cache
def _onednn_linear():
    """oneDNN's linear op when this torch build has one that computes x Wᵀ correctly, else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        # fixed values, not torch.randn: the check must not draw from the global RNG (a resumed
        # run restores that RNG and then makes this first call at another point than the original)
        x = torch.arange(24, dtype=torch.float32).reshape(3, 8).sin()
        w = torch.arange(40, dtype=torch.float32).reshape(5, 8).cos()
        ok = torch.allclose(op(x, w, None, "none", [], ""), x @ w.t(), atol=1e-5)
        ok = ok and torch.allclose(op(x[:, :5], w[:, :5].t(), None, "none", [], ""), x[:, :5] @ w[:, :5])
    except (AttributeError, RuntimeError) as err:  # not built with oneDNN, or the op changed
        log.info("oneDNN linear unavailable (%s); CPU GEMMs stay on torch's default", err)
        return None
    return op if ok else None


@functools.cache
def _amd_x86() -> bool:
    """Whether this machine's CPU is an AMD x86-64 one (Linux: /proc/cpuinfo's vendor_id)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    if BACKEND not in ("auto", "onednn") or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if BACKEND == "auto" and not _amd_x86():
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or w.dim() != 2:
        return False
    if x.numel() // max(x.shape[-1], 1) * w.shape[0] * w.shape[1] < MIN_MACS:
        return False
    return _onednn_linear() is not None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x wᵀ (+ bias) for x [..., in], w [out, in] (any strides): oneDNN for fp32 CPU tensors,
    `F.linear` otherwise. No autograd through the oneDNN call: use it on tensors that need no
    gradient, or inside an autograd function."""
    if _use_onednn(x, w):
        return _onednn_linear()(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x w for x [..., k], w [k, n]: `linear` with the transposed view (no copy)."""
    return linear(x, w.t())


class FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W and b frozen; the backward is dx = dy W. Both GEMMs through `linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return (matmul(dy, weight) if ctx.needs_input_grad[0] else None), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `FrozenLinear` where oneDNN serves it and the weight
    and bias take no gradient."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if frozen and _use_onednn(x, weight):
        return FrozenLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
