"""`greentune demo --quick` runs the whole pipeline and reports the three perplexities."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path):
    env = {**os.environ, "GREENTUNE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "greentune", "demo", "--quick", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    ppl = summary["perplexity"]
    base, lora, scratch = (next(v for k, v in ppl.items() if k.startswith(p)) for p in ("base", "base + LoRA", "from scratch"))
    assert lora < base  # fine-tuning on the client's text helps
    assert lora < scratch  # reuse beats starting from nothing with the same steps
    assert "Held-out perplexity" in r.stdout
    run = tmp_path / "demo" / "lora"
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "ledger.jsonl", "report.html"):
        assert (run / name).exists(), name
