"""Run in a fresh process: the same LoRA training step with activation checkpointing ("on")
and without ("off"), and the peak memory of each (JSON on stdout).

usage: python _checkpointing_memory_probe.py MODEL_DIR BATCH SEQ

Bytes. `before`: RSS just before the measured step (model loaded, a warm-up step done,
AdamW state allocated). `peak`: the high-water RSS of the step's forward + backward (Linux
VmHWM, reset just before it by writing 5 to /proc/self/clear_refs; where that is refused,
the largest RSS a 1 ms sampler saw); `step_bytes` = peak − before. `predicted_activations[_checkpointed]`: the
planner's activation bytes for the same step, so the caller can tell a real drop from noise.
"""

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from greentune.adapters.lora import apply_lora
from greentune.models.facts import arch_facts
from greentune.models.loader import load_model
from greentune.plan.cost import Technique, Workload, memory_breakdown
from greentune.plan.hardware import detect_this
from greentune.quant.loading import release_free_memory
from greentune.train.activation_checkpointing import enable_
from greentune.train.loss import CausalLMLoss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared probe helper
from peak_rss import reset_hwm, vm_hwm  # noqa: E402

torch.set_num_threads(1)
model_dir, BATCH, SEQ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = load_model(model_dir)
apply_lora(model, ["attn", "mlp"], 4, 8.0, 0.0)
model.train()
objective = CausalLMLoss(model)
ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
n = torch.tensor(float(BATCH * (SEQ - 1)))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
proc = psutil.Process()


def step() -> float:
    loss = objective(ids, mask, ids, n)
    loss.backward()
    return loss.item()


def measured_step() -> dict:
    release_free_memory()
    before = proc.memory_info().rss
    use_hwm = reset_hwm()
    sampled = [before]
    stop = threading.Event()
    if not use_hwm:

        def sample():
            while not stop.is_set():
                sampled.append(proc.memory_info().rss)
                time.sleep(0.001)

        threading.Thread(target=sample, daemon=True).start()
    loss = step()
    peak = vm_hwm() if use_hwm else max(sampled)
    stop.set()
    opt.zero_grad(set_to_none=False)
    return dict(before=before, peak=peak, step_bytes=peak - before, loss=loss, hwm_reset=use_hwm)


step()  # warm-up: allocator caches, gradient buffers, AdamW state
opt.step()
opt.zero_grad(set_to_none=False)
# Checkpointed first: memory the allocator keeps from an earlier step can only make a later
# step look smaller, so this order can only understate the saving.
enable_(model)
result = {"on": measured_step()}
model.activation_checkpointing_disable()
result["off"] = measured_step()
mem = memory_breakdown(
    arch_facts(model_dir),
    Technique("probe", "lora", targets=("attn", "mlp"), rank=4),
    Workload(tokens=BATCH * SEQ, seq_len=SEQ, micro_batch=BATCH),
    detect_this(),
)
result.update(
    predicted_activations=mem["activations"],
    predicted_activations_checkpointed=mem["activations_checkpointed"],
)
print(json.dumps(result))
