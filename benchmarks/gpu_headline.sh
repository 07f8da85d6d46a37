#!/usr/bin/env bash
# The headline GPU measurements of a quantised base (issue 20) in one script, for a machine with one
# NVIDIA GPU (an H100/H200; not part of CI). At most ~8 min: each step has its own time limit, so
# one hang does not take the rest.
#
#   bash benchmarks/gpu_headline.sh [OUT_DIR]
#   bash benchmarks/gpu_headline.sh --smoke [OUT_DIR]   # CPU, tiny sizes: proves the script runs
#
# 1. dequant (90 s): dequantise s/weight per format, plain torch vs the Triton kernels, bit-exactness
#    on the device, and the fused-vs-dequantise GEMM crossover (linear and grouped experts);
# 2. models (160 s): 4 layers of Mixtral 8x7B's shapes, seq 2048, LoRA r16 attention + experts, bf16:
#    tokens/s and peak memory of greentune q4_k / nf4 / bf16, HF+PEFT bf16, HF+PEFT+bitsandbytes,
#    Unsloth (the last two where they import), round-robin;
# 3. reference (220 s): 32 layers of Mixtral 8x7B's shapes drawn and quantised on the device, q4_k,
#    activation checkpointing, 20 steps: peak memory, tokens/s, NVML J/token, the 10 h / 1 kW
#    projection beside `greentune plan`'s.
# Everything goes to OUT_DIR/gpu_headline.log (default OUT_DIR: $OUT on the lent device machine,
# else ./gpu-headline); the last lines printed are the headline numbers and a summary.
# Uses whatever python3 holds a CUDA torch (with the triton it ships); GREENTUNE_PYTHON overrides it.
# Packages the machine lacks come as wheels in ./.whl (installed to /tmp/site, put on PYTHONPATH),
# e.g. bitsandbytes for the HF+PEFT+bnb contestant: `pip download --no-deps -d .whl bitsandbytes`
# (43 MB); Unsloth needs a dozen packages besides and is reported as skipped without them.
set -u
smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
out=${1:-${OUT:-gpu-headline}}
mkdir -p "$out"
py=${GREENTUNE_PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 GREENTUNE_CACHE=/tmp/gtcache
summary=()
log=$out/gpu_headline.log
: >"$log"
step() {   # step NAME SECONDS CMD...: run with a time limit, append to the log, record rc and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >/tmp/gt-headline-step.log 2>&1
  local rc=$?
  cat /tmp/gt-headline-step.log >>"$log"
  summary+=("$name rc=$rc $((SECONDS - t0))s")
}

{ if [ ${#smoke[@]} -eq 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version,clocks.max.sm --format=csv
  fi
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__)"
  $py -c "import triton; print('triton', triton.__version__)" || echo "triton missing: the kernels cannot run"
  nproc; } 2>&1 | tee -a "$log"

step dequant 90 $py benchmarks/gpu_headline.py dequant "${smoke[@]}"
step models 160 $py benchmarks/gpu_headline.py models "${smoke[@]}"
step reference 220 $py benchmarks/gpu_headline.py reference "${smoke[@]}"

echo "=== headline lines"
grep -E "^device|bit-exact (True|False)|fused wins|tokens/s|ratio|peak memory|J/token|projection|greentune plan|utilisation|skipped|built|Error|error" \
  "$log" | tail -n 80
echo "=== summary"
printf '%s\n' "${summary[@]}"
