"""The text the shipped tiny models were trained on, and the held-out split.

The corpus is the Python standard library's own ``.py`` files (every machine with Python has
them), outside test and tool folders. Files, not windows, are split into training and held-out
text by a stable hash of their path relative to the stdlib root: ``is_heldout(relative_path)``.
This is the one place of that rule; ``scripts/train_tiny_moe.py`` trained the shipped models with
it and the benchmarks evaluate on the files it holds out.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
HELDOUT_PERCENT = 5
HELDOUT_RULE = f"int(sha256(relative_path)[:8], 16) % 100 < {HELDOUT_PERCENT}"


def stdlib_root() -> Path:
    """The standard library folder the corpus is read from (resolved)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> tuple[Path, list[tuple[str, Path]]]:
    """The stdlib root and its corpus files as ``(relative posix path, path)``, sorted by relative path."""
    root = stdlib_root()
    seen, files = set(), []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel in seen or any(part in EXCLUDED_DIRS for part in rel.split("/")[:-1]) or not p.is_file():
            continue
        seen.add(rel)
        files.append((rel, p))
    files.sort()
    return root, files


def is_heldout(rel: str) -> bool:
    """Whether the file at ``rel`` (posix path relative to the stdlib root) is held-out text."""
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT

