"""Crops for evaluation: ArcFace alignment (t=0), the detector-box crop (t=1), and every warp in between.

A crop is described by where the output image sits in the source photo: its centre ``(cx, cy)`` (source
pixels), a rotation ``angle`` (radians) and per-axis scales ``(sx, sy)`` (source pixels per output pixel).
Output pixel ``p`` samples source point ``c + R(angle) diag(sx, sy) (p - o)``, ``o = (size-1)/2``, with
OpenCV pixel-centre coordinates. Interpolating these five numbers (scales geometrically) moves the crop
smoothly from the aligned face to the box crop — the alignment-robustness sweep of the paper's Figure 5.
Keypoints are mapped with the same matrix as the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..keypoints import ARCFACE_TEMPLATE_112

__all__ = [
    "CropParams",
    "aligned_crop_params",
    "box_from_landmarks",
    "box_crop_params",
    "interpolate_crop",
    "crop_matrix",
    "warp_face",
]


@dataclass(frozen=True)
class CropParams:
    cx: float
    cy: float
    angle: float
    sx: float
    sy: float


def _params_from_matrix(m: np.ndarray, size: int) -> CropParams:
    """Crop parameters of a forward (source -> output) similarity or axis-aligned scaling matrix."""
    inv = cv2.invertAffineTransform(m)
    o = (size - 1) / 2.0
    centre = inv[:, :2] @ np.array([o, o]) + inv[:, 2]
    a = inv[:, :2]
    angle = float(np.arctan2(a[1, 0], a[0, 0]))
    rot_t = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    diag = rot_t @ a
    return CropParams(float(centre[0]), float(centre[1]), angle, float(diag[0, 0]), float(diag[1, 1]))


def aligned_crop_params(landmarks_px: np.ndarray, size: int = 112) -> CropParams:
    """The ArcFace alignment of a face with 5 landmarks (source pixels) as crop parameters."""
    from ..face.align import similarity_transform  # the face pipeline's own (eval loads face only here)

    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    return _params_from_matrix(similarity_transform(landmarks_px, template), size)


def box_from_landmarks(landmarks_px: np.ndarray, scale: float = 2.2, shift: float = -0.12) -> np.ndarray:
    """A square detector-like box ``(x1, y1, x2, y2)`` around 5 landmarks, for data without detector boxes.

    Side = ``scale`` x the larger side of the landmarks' bounding box; the centre is the landmarks' box
    centre moved by ``shift`` x side vertically (negative: up, since the five points sit in the lower face).
    For the ArcFace template this gives a 90-pixel box on the 112 crop, about as tight as RetinaFace boxes.
    This deliberately differs from :func:`kprpe.face.align.box_from_keypoints`, which reproduces dlib's much
    tighter HOG box (77 pixels on the crop, cutting the forehead): the sweep's t=1 end stands for the paper's
    detector crop, so its box follows the detector the paper used.
    """
    pts = np.asarray(landmarks_px, dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    side = scale * float(max(hi - lo))
    if side <= 0:
        raise ValueError("degenerate landmarks: zero extent")
    cx, cy = (lo + hi) / 2.0
    cy += shift * side
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def box_crop_params(box: np.ndarray, size: int = 112) -> CropParams:
    """The box ``(x1, y1, x2, y2)`` simply resized to ``size`` x ``size`` (the paper's "unaligned" input), as
    crop parameters the sweep can interpolate.

    The crop is :func:`kprpe.face.align.box_crop_transform`'s, the one definition shared with the face
    pipeline: the box is in continuous pixel coordinates (pixel centres at integers, a whole W x H image is
    ``(-0.5, -0.5, W - 0.5, H - 0.5)``), its edges map to the crop's outer edges, and it is not squared.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"invalid box {box}: need x2 > x1 and y2 > y1")
    from ..face.align import box_crop_transform

    return _params_from_matrix(box_crop_transform((x1, y1, x2, y2), size), size)


def interpolate_crop(start: CropParams, end: CropParams, t: float) -> CropParams:
    """The crop a fraction ``t`` of the way from ``start`` (t=0) to ``end`` (t=1): centre and angle linear
    (angle the short way round), scales geometric."""
    d_angle = (end.angle - start.angle + np.pi) % (2 * np.pi) - np.pi
    return CropParams(
        cx=start.cx + t * (end.cx - start.cx),
        cy=start.cy + t * (end.cy - start.cy),
        angle=start.angle + t * d_angle,
        sx=float(np.exp((1 - t) * np.log(start.sx) + t * np.log(end.sx))),
        sy=float(np.exp((1 - t) * np.log(start.sy) + t * np.log(end.sy))),
    )


def crop_matrix(params: CropParams, size: int = 112) -> np.ndarray:
    """Forward 2x3 matrix (source pixels -> output pixels) of a crop."""
    c, s = np.cos(params.angle), np.sin(params.angle)
    a = np.array([[c, -s], [s, c]]) @ np.diag([params.sx, params.sy])
    o = (size - 1) / 2.0
    inv = np.zeros((2, 3))
    inv[:, :2] = a
    inv[:, 2] = np.array([params.cx, params.cy]) - a @ np.array([o, o])
    return cv2.invertAffineTransform(inv)


def warp_face(image: np.ndarray, landmarks_px: np.ndarray, params: CropParams, size: int = 112
              ) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (H, W, 3) uint8 with a crop; return the ``size``x``size`` crop (black border) and the
    landmarks mapped into it, normalised by ``size`` (model keypoints). A photo much larger than the crop is
    shrunk with area averaging first, as in the face pipeline
    (:func:`kprpe.face.align.downscale_for_warp`)."""
    from ..face.align import apply_transform, warp_crop

    m = crop_matrix(params, size)
    return warp_crop(image, m, size, antialias=True), apply_transform(m, landmarks_px) / size
