#!/usr/bin/env bash
# The GPU checks in one script, for a machine with one NVIDIA GPU (not part of CI, which has none).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # ~5 min on an H100/H200
#
# 1. tests/gpu (bf16 compute with fp32 LoRA masters, NVML energy in the ledger, CUDA RNG across a
#    SIGKILL + resume, the quantised formats and the sparse experts on the GPU);
# 2. greentune's NVML meter against nvidia-smi's power readings over the same window;
# 3. benchmarks/train_throughput.py and moe_throughput.py on the GPU (bf16) vs HF transformers + PEFT;
# 4. the planner's calibration on this GPU, and the seed plan (Mixtral 8x7B) with it.
# Each step has its own time limit, so one hang does not take the rest. Everything goes to
# OUT_DIR/gpu_check.log (default OUT_DIR: $OUT on the lent device machine, else ./gpu-check), the
# tests' observations to facts.jsonl, the planner's calibration beside them; the last lines printed
# are the headline numbers and a summary.
# Uses whatever python3 holds a CUDA torch; GREENTUNE_PYTHON overrides it. Packages greentune needs
# that the machine lacks can come as wheels in ./.whl (installed to /tmp/site, put on PYTHONPATH).
set -u
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
py=${GREENTUNE_PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 GREENTUNE_CACHE=/tmp/gtcache
summary=()
log=$out/gpu_check.log
: >"$log"
step() {   # step NAME SECONDS CMD...: run with a time limit, append to the log, record rc and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >/tmp/gt-step.log 2>&1
  local rc=$?
  cat /tmp/gt-step.log >>"$log"
  summary+=("$name rc=$rc $((SECONDS - t0))s")
}

{ nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__)"
  nproc; } 2>&1 | tee -a "$log"

export GREENTUNE_GPU_FACTS=$out/facts.jsonl
step tests 180 $py -m pytest tests/gpu -q -s -p no:cacheprovider --basetemp=/tmp/gt-gpu-tests
unset GREENTUNE_GPU_FACTS
step nvml 45 $py tests/energy/nvml_vs_nvidia_smi.py --seconds 15
step train_throughput 90 $py benchmarks/train_throughput.py --device cuda --steps 10 --rounds 3
step train_throughput_b16x1024 90 $py benchmarks/train_throughput.py --device cuda --steps 5 --rounds 3 \
  --batch 16 --seq 1024
step moe_throughput 120 $py benchmarks/moe_throughput.py --device cuda --steps 10
step calibrate 120 $py -m greentune plan --calibrate --calibrate-seconds 10
step seed_plan 40 $py -m greentune plan --model mixtral-8x7b --hardware this --power-cap-w 1000 --deadline-h 10
find /tmp/gtcache -maxdepth 2 -name 'calibration*.json' -exec cp {} "$out/" \; 2>/dev/null

echo "=== headline lines"
grep -E "passed|failed|error|Error|^\{\"gpu|tokens/s|ratio|achieved|one MoE layer|active-compute|calibrated|greentune /" "$log" \
  | grep -v "^\s*$" | tail -n 60
echo "=== summary"
printf '%s\n' "${summary[@]}"
