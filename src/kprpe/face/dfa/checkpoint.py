"""Loading the official DFA aligner checkpoint (``minchul/cvlface_DFA_mobilenet`` layouts), strictly.

Accepted: ``pretrained_model/model.pt`` (the research checkpoint, keys ``net.…``), an HF-level
``model.safetensors`` (keys ``model.net.…``), or a folder holding either. Pickles are read with
``torch.load(weights_only=True)`` only. Every key must be present with its exact shape; nothing is guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import KprpeError
from ...nn.checkpoint import CheckpointError, compare_shapes, read_state_dict
from .aligner import DifferentiableFaceAligner

__all__ = ["AlignerCheckpointError", "find_aligner_weights", "load_aligner", "aligner_state_dict"]

# Looked for in this order inside a folder (an HF snapshot has both; safetensors avoids unpickling).
_FOLDER_CANDIDATES = ("model.safetensors", "pretrained_model/model.pt", "model.pt")
_LAYOUT_PREFIXES = ("model.net.", "net.")
_CONFIG_NAMES = ("pretrained_model/model.yaml", "model.yaml")


class AlignerCheckpointError(CheckpointError, KprpeError):
    """A file that is not a DFA aligner checkpoint, or one that does not match the architecture exactly."""


def find_aligner_weights(directory: Path) -> Path:
    """The weights file of an aligner folder (HF snapshot or research run folder)."""
    for name in _FOLDER_CANDIDATES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    listed = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "(empty)"
    raise AlignerCheckpointError(
        f"no DFA aligner weights in {directory}: expected one of {', '.join(_FOLDER_CANDIDATES)}; "
        f"it contains: {listed}"
    )


def _looks_like_recognition_model(keys: list[str]) -> bool:
    """ViT (patch_embed/blocks) or IResNet (input_layer/body.N/output_layer) keys, and no aggregator."""
    markers = ("patch_embed.", "blocks.", "pos_embed", "input_layer.", "output_layer.", "feature.")
    return any(key.startswith(markers) for key in keys) and not any(k.startswith("aggregator.") for k in keys)


def _strip_layout_prefix(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    keys = list(state)
    stripped = None
    for prefix in _LAYOUT_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            break
    bare = list(stripped) if stripped is not None else keys
    if _looks_like_recognition_model(bare):
        raise AlignerCheckpointError(
            f"{path} holds a face-recognition model, not the DFA aligner (keys such as {keys[0]!r}); "
            "load it with kprpe.load_official / --weights, and give the aligner checkpoint "
            "(pretrained_model/model.pt of minchul/cvlface_DFA_mobilenet) here"
        )
    if stripped is None:
        sample = ", ".join(repr(k) for k in keys[:3]) or "(no tensors)"
        raise AlignerCheckpointError(
            f"{path} is not a DFA aligner checkpoint: expected every key to start with 'net.' "
            f"(pretrained_model/model.pt) or 'model.net.' (model.safetensors), got keys like {sample}"
        )
    return {"net." + k: v for k, v in stripped.items()}


def _check_config(weights: Path) -> float:
    """The padding ratio in the official model.yaml beside the weights (0 if none); refuses other variants."""
    for base in (weights.parent, weights.parent.parent):
        for name in _CONFIG_NAMES:
            path = base / name
            if path.is_file():
                return _padding_from_config(path)
    return 0.0


def _padding_from_config(path: Path) -> float:
    from ...nn.config_file import read_config_yaml

    try:  # bounded: size, depth, alias expansion (an untrusted folder's YAML)
        config = read_config_yaml(path)
    except (OSError, ValueError) as exc:
        raise AlignerCheckpointError(f"{path} is not a readable YAML aligner config: {exc}") from None
    if not isinstance(config, dict):
        raise AlignerCheckpointError(
            f"{path}: expected a mapping of aligner settings, got {type(config).__name__}"
        )
    expected = {"arch": "mobile0.25", "input_size": 160, "output_size": 112}
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise AlignerCheckpointError(
                f"{path}: {key} = {config[key]!r}, but the DFA aligner supports only {key} = {value!r}"
            )
    ratio = config.get("input_padding_ratio", 0.0) or 0.0
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 10.0:
        raise AlignerCheckpointError(
            f"{path}: input_padding_ratio must be a number in [0, 10), got {ratio!r}"
        )
    return float(ratio)


def aligner_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an aligner weights file, keys normalised to the ``net.`` layout."""
    try:
        state, _ = read_state_dict(path)
    except CheckpointError as exc:
        raise AlignerCheckpointError(str(exc)) from exc
    return _strip_layout_prefix(state, path)


def load_aligner(
    source: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> DifferentiableFaceAligner:
    """The official DFA aligner from a checkpoint file or folder, in eval mode on ``device``.

    ``source``: ``model.safetensors`` (``model.net.`` keys), ``pretrained_model/model.pt`` (``net.`` keys),
    or a folder holding one of them (an HF snapshot of ``minchul/cvlface_DFA_mobilenet``). Loading is strict:
    every tensor must exist with the official shape. Raises :class:`AlignerCheckpointError` naming the file
    otherwise.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise AlignerCheckpointError(f"aligner source must be a path, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        path = find_aligner_weights(path)
    elif not path.is_file():
        raise AlignerCheckpointError(f"aligner checkpoint not found: {path}")
    state = aligner_state_dict(path)
    aligner = DifferentiableFaceAligner(input_padding_ratio=_check_config(path))
    mismatch = compare_shapes(aligner.state_dict(), state)
    if mismatch:
        raise AlignerCheckpointError(
            f"{path} does not match the official DFA aligner (RetinaFace-mobilenet0.25 + mixer aggregator, "
            f"input 160): {mismatch.summary(limit=3)}"
        )
    floating = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if floating:
        raise AlignerCheckpointError(f"{path}: non-finite values in {', '.join(floating[:5])}")
    aligner.load_state_dict(state, strict=True)
    return aligner.eval().to(device)
