"""Real text that every Python install has: the standard library's own files.

The demo needs two different slices of real text — one the base model "was pretrained
on" and one the "client" wants — without any download. The standard library gives both:
its docstrings (English prose about programming) and its source code (Python). The
modules are listed in sorted order and split by name hash, so every machine with the same
Python version gets the same text.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
    files = []
    for p in sorted(root.rglob("*.py")):
        if skip.intersection(p.relative_to(root).parts):
            continue
        files.append(p)
    return files


def _bucket(path: Path, n: int) -> int:
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % n


def docstrings(limit_chars: int = 2_000_000, part: int | None = None, n_parts: int = 1) -> list[str]:
    """Docstrings of stdlib modules, classes and functions, one sample each."""
    out, total = [], 0
    for p in stdlib_files():
        if part is not None and _bucket(p, n_parts) != part:
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc.strip())
                    total += len(doc)
                    if total >= limit_chars:
                        return out
    return out


def source_snippets(
    limit_chars: int = 2_000_000, part: int | None = None, n_parts: int = 1, max_lines: int = 40
) -> list[str]:
    """Source code of stdlib files cut into chunks of at most `max_lines` lines."""
    out, total = [], 0
    for p in stdlib_files():
        if part is not None and _bucket(p, n_parts) != part:
            continue
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, ValueError):
            continue
        for i in range(0, len(lines), max_lines):
            chunk = "\n".join(lines[i : i + max_lines]).strip()
            if len(chunk) > 80:
                out.append(chunk)
                total += len(chunk)
                if total >= limit_chars:
                    return out
    return out
