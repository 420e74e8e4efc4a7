"""Batched embedding with optional flip test-time augmentation — shared by the face pipeline and
evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .keypoints import FACE_FLIP_PERMUTATION, flip_keypoints
from .nn.vit import normalize_embedding

__all__ = ["to_model_input", "embed", "iter_batches"]


def to_model_input(images) -> torch.Tensor:
    """uint8 images ``(B, H, W, 3)`` RGB (numpy or torch) -> float ``(B, 3, H, W)`` in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 RGB images (B, H, W, 3), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"to_model_input expects shape (B, H, W, 3), got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def embed(
    model: nn.Module,
    images: torch.Tensor,
    keypoints: torch.Tensor | None = None,
    *,
    flip: bool = False,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip_permutation=FACE_FLIP_PERMUTATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed model-ready images ``(B, 3, H, W)`` in [-1, 1] with keypoints ``(B, K, 2)`` (or None).

    With ``flip=True`` the raw embeddings of the image and its mirror (keypoints mirrored and left/right
    swapped) are summed before normalising, the field's usual test-time augmentation.
    Returns ``(unit embeddings (B, D), norms (B,))`` on the CPU.
    """
    model.eval()
    if device is None:  # an engine (kprpe.export.OnnxEngine) names its device; a module has parameters
        device = getattr(model, "device", None) or next(model.parameters()).device
    device = torch.device(device)
    if not getattr(model, "uses_keypoints", True):
        keypoints = None  # models without keypoints (and their ONNX graphs) take images only
    width = images.shape[-1]
    units, norms = [], []
    for sl in iter_batches(images.shape[0], batch_size):
        x = images[sl].to(device)
        kp = keypoints[sl].to(device) if keypoints is not None else None
        out = model(x, kp)
        if flip:
            kp_f = flip_keypoints(kp, width, flip_permutation) if kp is not None else None
            out = out + model(torch.flip(x, dims=[-1]), kp_f)
        unit, norm = normalize_embedding(out.float())
        units.append(unit.cpu())
        norms.append(norm.squeeze(-1).cpu())
    if not units:
        dim = getattr(getattr(model, "config", None), "output_dim", 0)
        return torch.empty(0, dim), torch.empty(0)
    return torch.cat(units), torch.cat(norms)
