"""Compile the Triton kernels for a CUDA GPU (sm_90) without one, and count fused multiply-adds.

Run by `test_triton_kernels.py` without ``TRITON_INTERPRET`` (the interpreter runs the Python,
not the compiler). Prints one JSON object: per kernel, its cubin size and the number of
``fma.rn.f32`` instructions in its PTX, which must be 0 for the dequantised values to equal
torch's separate multiply and add (`triton_dequant.launch_options`); ``contracted`` is the same
count for the Q4_K dequantise kernel compiled with fusion allowed, to show the check can fail.
"""

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from greentune.quant import triton_dequant as td
from greentune.quant import triton_matmul as tm

TARGET = GPUTarget("cuda", 90, 32)
DEQUANT = {
    "q_ptr": "*u8",
    "out_ptr": "*bf16",
    "code_ptr": "*fp32",
    "n_rows": "i32",
    "n_cols": "i32",
    "row_bytes": "i32",
    "FMT": "constexpr",
    "BR": "constexpr",
    "BC": "constexpr",
}
GEMM = {
    "a_ptr": "*bf16",
    "q_ptr": "*u8",
    "o_ptr": "*bf16",
    "offs_ptr": "*i32",
    "code_ptr": "*fp32",
    "E": "i32",
    "N": "i32",
    "K": "i32",
    "row_bytes": "i32",
    "expert_bytes": "i32",
    "FMT": "constexpr",
    "PREC": "constexpr",
    "UPCAST": "constexpr",
    "BM": "constexpr",
    "BN": "constexpr",
    "BK": "constexpr",
}


def compiled(fn, signature, constexprs, **options):
    names = list(fn.arg_names)  # the kernel's own parameter names
    sig = dict(zip(names, signature.values()))
    k = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=TARGET,
        options={**td.launch_options(), **options},
    )
    return {"cubin_bytes": len(k.asm["cubin"]), "fma": len(re.findall(r"\bfma\.rn\.f32\b", k.asm["ptx"]))}


BM, BN, BK = tm.GPU_TILES
out = {
    f"dequant_{n}": compiled(td._dequant_kernel, DEQUANT, {"FMT": td.FORMAT_IDS[n], "BR": 8, "BC": 256})
    for n in ("q4_k", "q6_k", "nf4")
}
for name, kernel in (("forward_q4_k", tm._forward_kernel), ("input_grad_q4_k", tm._input_grad_kernel)):
    out[name] = compiled(
        kernel,
        GEMM,
        {"FMT": td.FORMAT_IDS["q4_k"], "PREC": "tf32", "UPCAST": False, "BM": BM, "BN": BN, "BK": BK},
    )
out["contracted"] = compiled(
    td._dequant_kernel, DEQUANT, {"FMT": td.FORMAT_IDS["q4_k"], "BR": 8, "BC": 256}, enable_fp_fusion=True
)["fma"]
print(json.dumps(out))
