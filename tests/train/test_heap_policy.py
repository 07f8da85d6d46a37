"""The host heap during training: the loaders' 1 MB mmap threshold is raised after the first
step only when memory allows (or when asked), and then large temporaries stop faulting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from greentune import heap
from greentune.train import heap_policy

PROBE = r"""
import json, resource, sys
import torch
from greentune import heap
from greentune.train.heap_policy import relax_after_first_step

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        t = torch.ones(2 << 20)  # 8 MB, written: every fresh page faults
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

assert heap.limit_heap_retention()
flat = faults()
reason = relax_after_first_step("cpu")
faults()  # the first allocations under the new setting grow the heap once
print(json.dumps({"reason": reason, "threshold": heap.fixed_threshold, "flat": flat, "relaxed": faults()}))
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_relaxed_when_memory_allows_and_then_temporaries_stop_faulting():
    r = _probe(GREENTUNE_MEMORY_GB="1000")
    assert r["threshold"] == heap_policy.RELAXED_THRESHOLD and "raised to 32 MB" in r["reason"]
    assert r["flat"] > 20 * 1000  # each 8 MB temporary a fresh mapping: ~2,048 faults apiece
    assert r["relaxed"] < r["flat"] / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_flat_when_memory_is_tight_or_when_asked():
    for env in ({"GREENTUNE_MEMORY_GB": "0.01"}, {"GREENTUNE_MEMORY_GB": "1000", heap_policy.ENV: "flat"}):
        r = _probe(**env)
        assert r["reason"] is None and r["threshold"] == heap.MMAP_THRESHOLD, env


def test_nothing_to_relax_when_no_loader_fixed_the_threshold(monkeypatch):
    monkeypatch.setattr(heap, "fixed_threshold", None)
    assert heap_policy.relax_after_first_step("cpu") is None
