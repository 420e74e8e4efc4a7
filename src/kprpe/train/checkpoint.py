"""Training checkpoints: written atomically, read back without unpickling arbitrary objects.

Layout of ``<output_dir>/checkpoints/step_00001000/``::

    model.safetensors         the backbone (kprpe.save_model: kprpe.load_official / kprpe verify read it)
    head.rank{r}.safetensors  process r's class centres and margin buffers (AdaFace statistics)
    state.rank{r}.pt          optimiser, scheduler, RNG states, step/epoch/position (torch.load weights_only)
    meta.json                 step, world size, the resolved config

Every process writes into a temporary directory, which process 0 renames once all are done; ``latest``
(a one-line text file, replaced atomically) names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import KprpeError
from ..files import atomic_path

__all__ = [
    "CheckpointState",
    "checkpoint_dir",
    "latest_checkpoint",
    "prune_checkpoints",
    "read_meta",
    "save_torch_atomic",
    "load_torch_state",
]


class CheckpointState(KprpeError, ValueError):
    """A resume checkpoint that cannot be used; the message names the file and why."""


def save_torch_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointState(f"resume state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointState(f"cannot read {path} with torch.load(weights_only=True): {exc}") from exc


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (via ``latest``), or None."""
    pointer = output_dir / "checkpoints" / "latest"
    if pointer.is_file():
        path = output_dir / "checkpoints" / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    done = sorted(p for p in (output_dir / "checkpoints").glob("step_*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    done = sorted(p for p in (output_dir / "checkpoints").glob("step_*") if (p / "meta.json").is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointState(f"{path} is not a complete checkpoint (no meta.json)")
    return json.loads(meta_path.read_text())
