"""kprpe.gait is a task package of its own: it never imports the face pipeline (or models, training,
evaluation), nor torch."""

from __future__ import annotations

import ast
from pathlib import Path

GAIT = Path(__file__).resolve().parents[2] / "src" / "kprpe" / "gait"
FORBIDDEN = ("face", "nn", "train", "eval", "serve", "export", "zoo")


def test_gait_imports_no_other_task():
    for path in GAIT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 2:  # from ..x import y
                    assert module.split(".")[0] not in FORBIDDEN, f"{path.name} imports kprpe.{module}"
                assert not any(module.startswith(f"kprpe.{f}") for f in FORBIDDEN), f"{path.name}: {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not any(alias.name.startswith(f"kprpe.{f}") for f in FORBIDDEN), path.name


def test_gait_never_imports_torch():
    # the data half is numpy only; a training loader wraps it, so packing and generating stay light
    for path in GAIT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path.name
