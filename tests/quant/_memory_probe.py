"""Run in a fresh process: load a model with load_quantized and report memory (JSON on stdout).

usage: python _memory_probe.py MODEL_DIR FMT WARMUP_DIR

Figures in bytes. `base`: RSS after imports and a warm-up load of a tiny model. `peak`: the
high-water RSS during the load (Linux VmHWM, reset just before the load by writing 5 to
/proc/self/clear_refs; where that is refused, the largest RSS seen by a 1 ms sampler).
`after`: RSS with the loaded model alive; `freed`: after deleting it again, so `after − freed`
is the memory the model itself holds.
"""

import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from greentune.quant import QuantEmbedding, QuantExperts3D, QuantLinear, load_quantized
from greentune.quant.loading import release_free_memory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared probe helper
from peak_rss import reset_hwm, vm_hwm  # noqa: E402

torch.set_num_threads(1)
model_dir, fmt, warmup = sys.argv[1:4]
load_quantized(warmup, fmt)  # import and touch every code path once
gc.collect()
release_free_memory()
proc = psutil.Process()
base = proc.memory_info().rss
use_hwm = reset_hwm()
sampled = [base]
stop = threading.Event()
if not use_hwm:

    def sample():
        while not stop.is_set():
            sampled.append(proc.memory_info().rss)
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
model = load_quantized(model_dir, fmt)
peak = vm_hwm() if use_hwm else max(sampled)
stop.set()
gc.collect()
after = proc.memory_info().rss
quant = [m for m in model.modules() if isinstance(m, QuantLinear | QuantExperts3D | QuantEmbedding)]
packed = sum(m.qweight.numel() for m in quant)
quantised = sum(m.in_features * m.out_features * getattr(m, "num_experts", 1) for m in quant)
expected_bits = sum(
    m.in_features * m.out_features * getattr(m, "num_experts", 1) * m.fmt.bits_per_weight for m in quant
)
formats = sorted({m.fmt.name for m in quant})
dense = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(m.in_features * m.out_features * 4 for m in quant)
n_modules = len(quant)
del model, quant
gc.collect()
release_free_memory()
freed = proc.memory_info().rss
print(
    json.dumps(
        dict(
            base=base,
            peak=peak,
            after=after,
            freed=freed,
            hwm_reset=use_hwm,
            packed=packed,
            quantised_params=quantised,
            dense_bytes=dense,
            largest_fp32=largest,
            modules=n_modules,
            expected_bits=expected_bits,
            formats=formats,
        )
    )
)
