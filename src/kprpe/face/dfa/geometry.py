"""The alignment maths of the DFA aligner, batched in torch: similarity fit, affine_grid theta, landmark
mapping.

Frames: the network frame is the 160x160 preprocessed image, the output frame the 112x112 crop. Landmarks are
normalised by the frame size, ``[..., 0]`` = x (right), ``[..., 1]`` = y (down). The similarity is fitted to
``landmarks * 160`` as pixel coordinates (OpenCV convention) onto the ArcFace template in 112-crop pixels.
``theta`` follows ``F.affine_grid``: it maps OUTPUT normalised coordinates ``p / size * 2 - 1`` to INPUT ones.
The fits run in float64 on the CPU (the official aligner uses numpy/scikit-image there); a handful of 2x2 SVDs
per batch costs nothing, and it keeps the results identical on every device.
"""

from __future__ import annotations

import torch

from ...keypoints import ARCFACE_TEMPLATE_112

__all__ = [
    "reference_landmarks",
    "similarity_matrices",
    "theta_from_pixel_affine",
    "landmarks_through_theta",
]


def reference_landmarks(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ArcFace template ``(5, 2)`` in 112x112 crop pixels (the DFA's alignment target).

    The official values are the 96x112 ArcFace template stored in float32, then shifted 8 px right in float64
    (as the reference vectors show, to ~4e-9 px); rounding the same way keeps the fit within 1e-7 of it.
    """
    template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
    template[:, 0] -= 8.0
    template = template.to(torch.float32).to(torch.float64)
    template[:, 0] += 8.0
    return template.to(dtype)


def _det2(m: torch.Tensor) -> torch.Tensor:
    return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]


def similarity_matrices(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (Umeyama, no reflection) mapping ``source`` onto ``target``; ``(B, 2, 3)``.

    ``source`` ``(B, N, 2)``, ``target`` ``(N, 2)`` or ``(B, N, 2)``. Follows the Umeyama estimate as
    scikit-image implements it, including its handling of rank-deficient constellations (collinear points); a
    mirrored constellation gets the best proper rotation. All points at one place give NaN (no transform
    exists).
    """
    source = source.to(torch.float64)
    target = target.to(torch.float64).expand_as(source)
    count = source.shape[-2]
    source_mean, target_mean = source.mean(dim=-2), target.mean(dim=-2)
    source_centred = source - source_mean[..., None, :]
    target_centred = target - target_mean[..., None, :]
    covariance = target_centred.transpose(-1, -2) @ source_centred / count
    signs = torch.ones(source.shape[0], 2, dtype=torch.float64, device=source.device)
    signs[:, 1] = torch.where(_det2(covariance) < 0, -1.0, 1.0)
    u, singular, vh = torch.linalg.svd(covariance)
    # numpy's matrix_rank tolerance: largest singular value * max(M, N) * eps
    tolerance = singular[:, :1] * 2 * torch.finfo(torch.float64).eps
    rank = (singular > tolerance).sum(dim=-1)
    rotation_signs = signs.clone()
    rank_deficient = rank == 1
    flip = rank_deficient & (_det2(u) * _det2(vh) <= 0)
    rotation_signs[:, 1] = torch.where(rank_deficient, torch.where(flip, -1.0, 1.0), signs[:, 1])
    rotation = u @ torch.diag_embed(rotation_signs) @ vh
    variance = source_centred.var(dim=-2, unbiased=False).sum(dim=-1)
    scale = (singular * signs).sum(dim=-1) / variance
    scale = torch.where(rank == 0, torch.nan, scale)
    translation = target_mean - scale[:, None] * (rotation @ source_mean[..., None])[..., 0]
    return torch.cat([scale[:, None, None] * rotation, translation[..., None]], dim=-1)


def _homogeneous(matrices: torch.Tensor) -> torch.Tensor:
    bottom = torch.zeros(*matrices.shape[:-2], 1, 3, dtype=matrices.dtype, device=matrices.device)
    bottom[..., 0, 2] = 1.0
    return torch.cat([matrices, bottom], dim=-2)


def _normaliser(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Pixel -> normalised ``p / size * 2 - 1`` as a 3x3 matrix."""
    return torch.tensor(
        [[2.0 / size, 0.0, -1.0], [0.0, 2.0 / size, -1.0], [0.0, 0.0, 1.0]], dtype=dtype, device=device
    )


def theta_from_pixel_affine(
    pixel_affine: torch.Tensor, input_size: int = 160, output_size: int = 112
) -> torch.Tensor:
    """``affine_grid`` theta ``(B, 2, 3)`` (output normalised -> input normalised) for an input->output pixel
    map.

    Uses the edge convention ``p / size * 2 - 1`` on both sides, as the official aligner does, although the
    grid is later sampled with ``align_corners=True``; kept on purpose so the crops match the official ones.
    """
    matrices = _homogeneous(pixel_affine.to(torch.float64))
    to_input = _normaliser(input_size, torch.float64, matrices.device)
    from_output = torch.linalg.inv(_normaliser(output_size, torch.float64, matrices.device))
    return (to_input @ torch.linalg.inv(matrices) @ from_output)[..., :2, :]


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of 2x3 affine maps ``(B, 2, 3)`` (in the dtype given)."""
    a, b, c = theta[..., 0, 0], theta[..., 0, 1], theta[..., 0, 2]
    d, e, f = theta[..., 1, 0], theta[..., 1, 1], theta[..., 1, 2]
    det = a * e - b * d
    inv_a, inv_b, inv_d, inv_e = e / det, -b / det, -d / det, a / det
    inv_c = -(inv_a * c + inv_b * f)
    inv_f = -(inv_d * c + inv_e * f)
    return torch.stack([torch.stack([inv_a, inv_b, inv_c], -1), torch.stack([inv_d, inv_e, inv_f], -1)], -2)


def apply_affine(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map ``(B, N, 2)`` points by ``(B, 2, 3)`` affine maps."""
    return points @ theta[..., :2].transpose(-1, -2) + theta[..., None, :, 2]


def landmarks_through_theta(landmarks: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Input-frame landmarks ``(B, 5, 2)`` in [0, 1] -> output-frame ones, by the inverse of ``theta``."""
    normalised = apply_affine(invert_affine(theta), landmarks * 2 - 1)
    return normalised / 2 + 0.5
