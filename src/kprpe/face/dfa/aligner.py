"""The official Differentiable Face Aligner (DFA): RGB image in [-1, 1] -> 112x112 aligned crop and 5
landmarks.

Pipeline (one batch shares one input shape): pad to a square with -1, optionally add a margin of
``int(side * padding_ratio)`` pixels of -1 per side, resize to 160 (bilinear, ``align_corners=True``), run
:class:`RetinaFace` on the BGR flip, fit the similarity from the aggregated landmarks to the ArcFace
template, and sample the crop with ``grid_sample``. The quirks of the official forward are kept so outputs
match it number for number (see ``AlignerOutput`` and tests/fixtures/dfa/README.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import KprpeError
from .geometry import (
    apply_affine,
    landmarks_through_theta,
    reference_landmarks,
    similarity_matrices,
    theta_from_pixel_affine,
)
from .retinaface import INPUT_SIZE, RetinaFace

__all__ = [
    "OUTPUT_SIZE",
    "AlignerInputError",
    "AlignerOutput",
    "DifferentiableFaceAligner",
    "input_landmarks",
    "preprocess",
    "warp",
]

OUTPUT_SIZE = 112
_PAD_VALUE = -1.0  # black in the [-1, 1] input range


class AlignerInputError(KprpeError, ValueError):
    """An input that is not a ``(B, 3, H, W)`` floating RGB tensor in [-1, 1], or a bad padding ratio."""


class AlignerOutput(NamedTuple):
    """The official DFA output tuple, in the official order.

    ``aligned_x``: ``(B, 3, 112, 112)`` RGB crop in [-1, 1] (-1 outside the photo).
    ``orig_pred_ldmks``: ``(B, 5, 2)`` landmarks normalised by the 160 network frame (including the square
    padding); with a padding ratio ``p > 0`` the margin is removed as ``((2l - 1)(1 + 2p)) / 2 + 0.5``.
    ``None`` for non-square input (as the official aligner).
    ``aligned_ldmks``: ``(B, 5, 2)`` landmarks in the crop, normalised by 112 (what KP-RPE models read).
    ``score``: ``(B, 1)`` face probability of the aggregated prediction; never thresholded here.
    ``thetas``: ``(B, 2, 3)`` ``affine_grid`` matrices, crop normalised -> 160-frame normalised.
    ``normalized_bbox``: ``(B, 4)`` aggregated box ``(x0, y0, x1, y1)`` divided by 160 **twice** (official
    quirk: multiply by 160 to get the box normalised by the 160 frame). ``None`` for non-square input.
    """

    aligned_x: torch.Tensor
    orig_pred_ldmks: torch.Tensor | None
    aligned_ldmks: torch.Tensor
    score: torch.Tensor
    thetas: torch.Tensor
    normalized_bbox: torch.Tensor | None


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise AlignerInputError(f"the aligner takes a torch tensor (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0 or min(x.shape[2:]) < 2:
        raise AlignerInputError(
            f"the aligner takes RGB images of shape (B>=1, 3, H>=2, W>=2), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise AlignerInputError(
            f"the aligner takes floating RGB in [-1, 1] ((pixel / 255 - 0.5) / 0.5), got dtype {x.dtype}"
        )
    low, high = float(x.detach().amin()), float(x.detach().amax())
    if not (low >= -1.001 and high <= 1.001):
        raise AlignerInputError(
            "the aligner takes RGB in [-1, 1] ((pixel / 255 - 0.5) / 0.5); "
            f"this input spans [{low:.4g}, {high:.4g}]"
        )


def _check_padding(ratio) -> float:
    value = float(ratio)
    if not (0.0 <= value < 10.0):
        raise AlignerInputError(f"padding ratio must be a number in [0, 10), got {ratio!r}")
    return value


def square_pad(height: int, width: int, padding_ratio: float) -> tuple[int, int, int]:
    """``(left, top, margin)`` pixels added before the image: square padding, then the margin."""
    side = max(height, width)
    left = (side - width) // 2
    top = (side - height) // 2
    return left, top, int(side * padding_ratio)


def preprocess(x: torch.Tensor, padding_ratio: float, size: int = INPUT_SIZE) -> torch.Tensor:
    """Pad to a square with -1 (shorter side: floor half before, the rest after), add the margin, resize."""
    height, width = x.shape[-2:]
    side = max(height, width)
    left, top, margin = square_pad(height, width, padding_ratio)
    if side != width or side != height:
        x = F.pad(x, (left, side - width - left, top, side - height - top), value=_PAD_VALUE)
    if padding_ratio > 0:
        x = F.pad(x, (margin, margin, margin, margin), value=_PAD_VALUE)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def warp(
    preprocessed: torch.Tensor, thetas: torch.Tensor, size: int = OUTPUT_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crop, grid)``: bilinear ``grid_sample`` with ``align_corners=True``, -1 outside the image.

    Samples ``preprocessed + 1`` with zero padding and subtracts 1 again, as the official aligner does (the
    round trip changes values by float32 rounding; kept so crops match bit for bit).
    """
    grid = F.affine_grid(thetas, [thetas.shape[0], preprocessed.shape[1], size, size], align_corners=True)
    crop = (
        F.grid_sample(preprocessed + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1
    )
    return crop, grid


class DifferentiableFaceAligner(nn.Module):
    """The official DFA (RetinaFace-MobileNet0.25 + mixer aggregator): input any size, crop 112x112.

    ``forward(x, padding_ratio_override=None)``: ``x`` ``(B, 3, H, W)`` RGB float in [-1, 1] (``(pixel / 255 -
    0.5) / 0.5``), on any device. Returns :class:`AlignerOutput`. ``padding_ratio_override`` replaces the
    configured ``input_padding_ratio`` for this call (a margin of black around the photo, for faces that fill
    the frame). The crop is differentiable with respect to ``x``; the similarity fit itself is not (as in the
    official code).
    """

    def __init__(self, input_padding_ratio: float = 0.0) -> None:
        super().__init__()
        self.input_padding_ratio = _check_padding(input_padding_ratio)
        self.input_size = INPUT_SIZE
        self.output_size = OUTPUT_SIZE
        self.net = RetinaFace(INPUT_SIZE)

    def forward(self, x: torch.Tensor, padding_ratio_override: float | None = None) -> AlignerOutput:
        return self.trace(x, padding_ratio_override)[0]

    def trace(
        self, x: torch.Tensor, padding_ratio_override: float | None = None
    ) -> tuple[AlignerOutput, dict]:
        """The output and every intermediate tensor (``preprocessed``, features, ``agg``, ``grid`` ...)."""
        _check_input(x)
        padding = (
            self.input_padding_ratio
            if padding_ratio_override is None
            else _check_padding(padding_ratio_override)
        )
        dtype = next(self.parameters()).dtype
        x = x.to(dtype)
        batch, _, height, width = x.shape
        inter: dict[str, torch.Tensor] = {}
        preprocessed = preprocess(x, padding, self.input_size)
        agg = self.net(preprocessed.flip(1), trace=inter)
        landmarks = agg[:, 6:16].reshape(batch, 5, 2)
        score = torch.softmax(agg[:, 4:6], dim=-1)[:, 1:]

        source = landmarks.detach().to("cpu", torch.float64) * self.input_size
        pixel_affine = similarity_matrices(source, reference_landmarks())
        theta64 = theta_from_pixel_affine(pixel_affine, self.input_size, self.output_size)
        thetas = theta64.to(device=x.device, dtype=dtype)
        aligned_x, grid = warp(preprocessed, thetas, self.output_size)
        aligned_ldmks = landmarks_through_theta(landmarks, thetas)

        square = height == width
        orig_pred_ldmks = normalized_bbox = None
        if square:
            orig_pred_ldmks = landmarks
            if padding > 0:
                shrink = 1 / (1 + 2 * padding)
                orig_pred_ldmks = ((landmarks * 2 - 1) / shrink) / 2 + 0.5
            normalized_bbox = agg[:, 0:4] / self.input_size
        inter.update(preprocessed=preprocessed, cv2_affine=pixel_affine, theta_f64=theta64, grid=grid)
        output = AlignerOutput(aligned_x, orig_pred_ldmks, aligned_ldmks, score, thetas, normalized_bbox)
        return output, inter


def input_landmarks(
    output: AlignerOutput, height: int, width: int, padding_ratio: float = 0.0
) -> torch.Tensor:
    """The 5 landmarks in pixels of the aligner's input image ``(B, 5, 2)``, OpenCV convention (pixel
    centres).

    Recovered from ``aligned_ldmks`` and ``thetas`` (so it works for non-square input, where the official
    ``orig_pred_ldmks`` is None) and mapped back exactly through the preprocessing: ``l * 160`` is a pixel of
    the 160 frame, which ``align_corners=True`` resizing ties to pixel ``l * 160 * (S - 1) / 159`` of the
    padded square of side ``S``; then the square padding and margin are removed. ``padding_ratio`` must be
    the one used.
    """
    padding = _check_padding(padding_ratio)
    frame = apply_affine(output.thetas, output.aligned_ldmks * 2 - 1) / 2 + 0.5
    left, top, margin = square_pad(height, width, padding)
    padded_side = max(height, width) + 2 * margin
    pixels = frame.to(torch.float64) * INPUT_SIZE * (padded_side - 1) / (INPUT_SIZE - 1)
    offset = torch.tensor([left + margin, top + margin], dtype=torch.float64, device=pixels.device)
    return pixels - offset
