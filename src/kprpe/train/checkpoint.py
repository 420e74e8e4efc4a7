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
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import KprpeError
from ..files import atomic_path, atomic_write_text
from ..nn import load_weights, save_model
from .distributed import DistInfo, barrier

__all__ = [
    "CheckpointState",
    "RestoredState",
    "save_checkpoint",
    "restore_checkpoint",
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
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        # the pointer names a sibling folder, nothing else: a path such as ../../x must not lead outside the
        # run
        if re.fullmatch(r"step_\d{8}", name):
            path = output_dir / "checkpoints" / name
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
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointState(f"{meta_path} is corrupt ({exc}); resume from another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointState(f"{meta_path} holds a JSON {type(meta).__name__}, expected an object")
    return meta


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dist_info: DistInfo,
    config: dict,
    bad_samples: int,
    keep: int,
) -> Path:
    """Write ``<output_dir>/checkpoints/step_<step>`` (every process its part, process 0 the model and meta),
    point ``latest`` at it and keep the newest ``keep``. Collective: every process must call it."""
    from safetensors.torch import save_file

    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    r, w = dist_info.rank, dist_info.world_size
    device = dist_info.device
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    head_state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(head_state, str(tmp / f"head.rank{r}.safetensors"))
    state = dict(
        step=step,
        bad_samples=bad_samples,
        world_size=w,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device)
        if device.type == "cuda"
        else torch.empty(0, dtype=torch.uint8),
        head_extra=head.extra_state(),
    )
    save_torch_atomic(state, tmp / f"state.rank{r}.pt")
    if dist_info.is_main:
        save_model(model, tmp / "model.safetensors", metadata={"kprpe_train_step": str(step)})
    barrier()
    if dist_info.is_main:
        meta = dict(step=step, world_size=w, num_classes=head.num_classes, config=config)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(final.parent / "latest", final.name + "\n")
        prune_checkpoints(output_dir, keep)
    barrier()
    return final


@dataclass
class RestoredState:
    """What a resumed run continues from (model, head, optimiser, scheduler and RNG are restored in place)."""

    step: int
    bad_samples: int
    path: Path


def restore_checkpoint(
    resume,
    output_dir: Path,
    *,
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dist_info: DistInfo,
) -> RestoredState:
    """Load ``resume`` (``"latest"`` or a checkpoint directory) into the given objects, checking that the
    run has the same number of processes and classes."""
    from safetensors.torch import load_file

    path = latest_checkpoint(output_dir) if str(resume) == "latest" else Path(resume)
    if path is None:
        raise CheckpointState(f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}")
    meta = read_meta(path)
    r, w, device = dist_info.rank, dist_info.world_size, dist_info.device
    if meta["world_size"] != w:
        raise CheckpointState(
            f"{path} was written by {meta['world_size']} processes but this run has {w}: the class centres "
            "are "
            f"sharded per process and exact resume needs the same number of processes"
        )
    if meta["num_classes"] != head.num_classes:
        raise CheckpointState(f"{path} has {meta['num_classes']} classes, the data set {head.num_classes}")
    load_weights(model, path / "model.safetensors")
    head_file = path / f"head.rank{r}.safetensors"
    if not head_file.is_file():
        raise CheckpointState(f"resume: {head_file} is missing")
    head.load_state_dict({k: v.to(device) for k, v in load_file(str(head_file)).items()})
    state = load_torch_state(path / f"state.rank{r}.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"].numel():
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    head.load_extra_state(state["head_extra"])
    return RestoredState(step=int(state["step"]), bad_samples=int(state.get("bad_samples", 0)), path=path)
