"""Keypoint conventions shared by the face pipeline, training and evaluation.

Pixel coordinates follow OpenCV: pixel ``(col, row)`` has its centre at ``(x, y) = (col, row)``. The model's
keypoints are those pixel coordinates divided by the image width (x) and height (y) — the ArcFace template in
pixels divided by 112 — so they are "normalised to [0, 1]" but not clipped: faces partly out of frame give
values outside. Five face points, in order: image-left eye, image-right eye, nose tip, image-left mouth
corner, image-right mouth corner.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "FACE_FLIP_PERMUTATION",
    "template_keypoints",
    "flip_keypoints",
    "normalize_keypoints",
    "denormalize_keypoints",
]

# ArcFace 112x112 alignment template in pixels (x, y).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # image-left eye
        [73.5318, 51.5014],  # image-right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # image-left mouth corner
        [70.7299, 92.2041],  # image-right mouth corner
    ],
    dtype=np.float64,
)

# A horizontal flip turns the image-left eye into the image-right eye, and so on.
FACE_FLIP_PERMUTATION = (1, 0, 2, 4, 3)


def _is_tensor(value) -> bool:
    # torch is imported only by code that makes tensors: if it is not loaded, nothing here is a tensor
    # (so numpy callers, and `kprpe --help`, never pay torch's ~3 s import)
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def template_keypoints(batch_size: int | None = None, dtype=None):
    """The ArcFace template as normalised model keypoints, a torch tensor (``dtype`` default float32):
    ``(5, 2)``, or ``(B, 5, 2)`` if ``batch_size``."""
    import torch

    kp = torch.tensor(ARCFACE_TEMPLATE_112 / 112.0, dtype=torch.float32 if dtype is None else dtype)
    return kp if batch_size is None else kp.expand(batch_size, 5, 2).clone()


def flip_keypoints(keypoints, width: int = 112, permutation=FACE_FLIP_PERMUTATION):
    """Keypoints of the horizontally flipped image (normalised, ``(..., K, 2)``; numpy or torch).

    Pixel x maps to ``width - 1 - x``, i.e. normalised ``x -> (width - 1) / width - x``; points are reordered
    by ``permutation`` (left/right swap) when one is given.
    """
    if _is_tensor(keypoints):
        out = keypoints.clone()
    else:
        out = np.array(keypoints, dtype=np.float64, copy=True)
    out[..., 0] = (width - 1) / width - out[..., 0]
    if permutation is not None:
        if out.shape[-2] != len(permutation):
            raise ValueError(
                f"flip permutation has {len(permutation)} points but keypoints have {out.shape[-2]}"
            )
        out = out[..., list(permutation), :]
    return out


def normalize_keypoints(points_px, width: int, height: int):
    """Pixel coordinates ``(..., K, 2)`` -> model keypoints (divide x by width, y by height)."""
    scale = np.array([width, height], dtype=np.float64)
    if _is_tensor(points_px):
        return points_px / points_px.new_tensor(scale)
    return np.asarray(points_px, dtype=np.float64) / scale


def denormalize_keypoints(keypoints, width: int, height: int):
    """Model keypoints ``(..., K, 2)`` -> pixel coordinates."""
    scale = np.array([width, height], dtype=np.float64)
    if _is_tensor(keypoints):
        return keypoints * keypoints.new_tensor(scale)
    return np.asarray(keypoints, dtype=np.float64) * scale
