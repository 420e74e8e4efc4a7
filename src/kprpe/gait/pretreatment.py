"""The published silhouette pretreatment (OpenGait's, for Gait3D and most sets), with the keypoints moved by
exactly the same transform so they stay on the silhouette pixels they marked.

Per frame: drop it if its pixel sum is at most 10000 (near-empty); crop to the first and last non-empty rows;
resize to height 64 keeping the aspect ratio (bicubic, width ``int(64 * W / h)``); centre a 64-wide window on
the mass column (the first column where the cumulative column mass exceeds half the total), zero-padding 32
columns on each side when the window would leave the image; cut 10 columns on each side (64 -> 44).

Coordinates: pixel-index coordinates, pixel ``(row i, column j)`` has its centre at ``x = j, y = i``.
The resize maps centres to centres, ``x' = (x + 0.5) * W' / W - 0.5`` (OpenCV's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_FRAME_MASS",
    "FrameTransform",
    "pretreat_frame",
    "frame_transform",
    "apply_to_keypoints",
    "clean_keypoints",
    "pretreat_frame_and_keypoints",
]

MIN_FRAME_MASS = 10000  # pixel sum (uint8) at or below which a frame is dropped as near-empty
HEIGHT = 64


@dataclass(frozen=True)
class FrameTransform:
    """Where one input frame went: rows ``top..bottom`` kept, resized to ``resized_width`` x 64, then output
    column 0 is column ``left`` of the resized frame (negative: zero padding) plus the final cut."""

    top: int
    bottom: int
    input_width: int
    resized_width: int
    left: int  # first kept column of the resized frame, after the final cut (may be negative)

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.input_width

    @property
    def scale_y(self) -> float:
        return HEIGHT / (self.bottom - self.top + 1)


def frame_transform(image: np.ndarray, width: int = 44, min_mass: int = MIN_FRAME_MASS):
    """``(FrameTransform, 64 x width uint8 frame)`` for one grayscale ``uint8`` frame, or ``None`` when the
    frame is dropped (near-empty, or so wide and flat that its resized width is 0)."""
    import cv2

    if width not in (44, 64):
        raise ValueError(f"output width must be 44 (cut) or 64, got {width}")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 silhouette, got {image.dtype} {image.shape}")
    if int(image.sum(dtype=np.int64)) <= min_mass:
        return None
    rows = np.flatnonzero(image.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    crop = image[top : bottom + 1]
    resized_width = int(HEIGHT * image.shape[1] / crop.shape[0])
    if resized_width < 1:
        return None
    resized = cv2.resize(crop, (resized_width, HEIGHT), interpolation=cv2.INTER_CUBIC)
    column_mass = resized.sum(axis=0, dtype=np.int64)
    total = int(column_mass.sum())
    if total == 0:
        return None
    centre = int(np.argmax(np.cumsum(column_mass) > total / 2))
    half = HEIGHT // 2
    left = centre - half
    if left < 0 or centre + half > resized_width:  # would leave the image: pad both sides by half a window
        resized = np.pad(resized, ((0, 0), (half, half)))
        window = resized[:, left + half : left + half + HEIGHT]
    else:
        window = resized[:, left : left + HEIGHT]
    cut = (HEIGHT - width) // 2
    frame = np.ascontiguousarray(window[:, cut : cut + width])
    return FrameTransform(top, bottom, image.shape[1], resized_width, left + cut), frame


def apply_to_keypoints(transform: FrameTransform, keypoints: np.ndarray) -> np.ndarray:
    """``[..., 3]`` keypoints ``(x, y, confidence)`` in input pixels -> the same points in the output frame
    (confidence unchanged)."""
    out = np.array(keypoints, dtype=np.float64, copy=True)
    out[..., 0] = (out[..., 0] + 0.5) * transform.scale_x - 0.5 - transform.left
    out[..., 1] = (out[..., 1] - transform.top + 0.5) * transform.scale_y - 0.5
    return out


def pretreat_frame(
    image: np.ndarray, keypoints: np.ndarray | None = None, width: int = 44, min_mass: int = MIN_FRAME_MASS
):
    """One frame through the pretreatment: ``(frame [64, width] uint8, keypoints or None)``, or ``None`` when
    the frame is dropped."""
    result = frame_transform(image, width, min_mass)
    if result is None:
        return None
    transform, frame = result
    return frame, (None if keypoints is None else apply_to_keypoints(transform, keypoints))


def clean_keypoints(keypoints: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int]:
    """Keypoints ``[17, 3]`` with invalid joints zeroed (x = y = confidence = 0) and how many there were.
    Invalid: a NaN/inf value, a negative confidence, or a confident joint outside the ``height x width`` input
    image (by over a pixel: detectors answer inside the image). Confidences above 1 are clipped to 1."""
    kp = np.array(keypoints, dtype=np.float64, copy=True)
    with np.errstate(invalid="ignore"):
        bad = ~np.all(np.isfinite(kp), axis=1) | (kp[:, 2] < 0)
        x, y = kp[:, 0], kp[:, 1]
        outside = (kp[:, 2] > 0) & ((x < -1) | (x > width) | (y < -1) | (y > height))
    bad |= outside
    kp[bad] = 0.0
    kp[:, 2] = np.clip(kp[:, 2], 0.0, 1.0)
    return kp, int(bad.sum())


def pretreat_frame_and_keypoints(
    image: np.ndarray, keypoints: np.ndarray, width: int = 44, min_mass: int = MIN_FRAME_MASS
):
    """A frame and its raw detector keypoints ``[17, 3]`` (input pixels) through the pretreatment:
    ``(frame, keypoints in frame pixels, number of invalid joints)``, or ``None`` when the frame is dropped.
    Invalid joints (see :func:`clean_keypoints`) and undetected ones (confidence 0) come out as (0, 0, 0)."""
    result = frame_transform(image, width, min_mass)
    if result is None:
        return None
    transform, frame = result
    cleaned, invalid = clean_keypoints(keypoints, *image.shape)
    moved = apply_to_keypoints(transform, cleaned)
    moved[cleaned[:, 2] <= 0] = 0.0  # missing joints stay (0, 0, 0), not a transformed origin
    return frame, moved.astype(np.float32), invalid
