"""From 5 face points in a photo to the 112x112 crop and normalised keypoints the model reads (docs/face.md,
"Conventions").

Coordinates follow :mod:`kprpe.keypoints`: pixel ``(col, row)`` has its centre at ``(x, y) = (col, row)``. A
face box is ``(x0, y0, x1, y1)`` in the same continuous coordinates (a box covering a whole W x H image is
``(-0.5, -0.5, W - 0.5, H - 0.5)``). Transforms are 2x3 matrices mapping photo pixels to crop pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import KprpeError
from ..keypoints import ARCFACE_TEMPLATE_112

__all__ = [
    "ALIGN_MODES",
    "CROP_SIZE",
    "TEMPLATE_FACE_BOX",
    "AlignedFace",
    "AlignmentError",
    "similarity_transform",
    "apply_transform",
    "box_crop_transform",
    "unaligned_crop",
    "box_from_keypoints",
    "warp_crop",
    "downscale_for_warp",
    "transform_scale",
    "align_face",
    "backend_aligned_face",
    "template_alignment_error",
]

CROP_SIZE = 112
ALIGN_MODES = ("aligned", "unaligned", "prealigned")

# Where dlib's HOG detector puts its box on an ArcFace-aligned face, in template pixels (measured on
# skimage's astronaut photo: the detector box mapped by the alignment transform). Used to make a
# detector-like box from keypoints alone (user-supplied landmarks without a box) and as the search region
# for landmarks on pre-aligned crops.
TEMPLATE_FACE_BOX = (17.0, 37.0, 94.0, 114.0)


class AlignmentError(KprpeError, ValueError):
    """Keypoints or boxes that cannot define a crop (wrong shape, not finite, degenerate)."""


@dataclass
class AlignedFace:
    """One face ready for the model.

    ``image``: ``(112, 112, 3)`` uint8 RGB crop. ``keypoints``: ``(5, 2)`` crop keypoints divided by 112 (the
    model's input). ``transform``: 2x3 photo-pixel -> crop-pixel matrix. ``source_keypoints``: the 5 points in
    photo pixels. ``box``: the detector box in photo pixels (None if unknown). ``mode``: how it was cropped.
    ``pixels``: ``(3, 112, 112)`` float32 RGB in [-1, 1] when the crop came from a backend as floats (the
    DFA's ``aligned_x``): the model reads these exactly, ``image`` is their uint8 rendering for files.
    """

    image: np.ndarray
    keypoints: np.ndarray
    transform: np.ndarray
    source_keypoints: np.ndarray
    box: tuple[float, float, float, float] | None
    mode: str
    score: float | None = None
    extra: dict = field(default_factory=dict)
    pixels: np.ndarray | None = None

    @property
    def keypoints_px(self) -> np.ndarray:
        """Crop keypoints in crop pixels."""
        return self.keypoints * CROP_SIZE


def _as_points(points, what: str = "keypoints") -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 2:
        raise AlignmentError(f"{what} must have shape (N>=2, 2), got {array.shape}")
    if not np.isfinite(array).all():
        raise AlignmentError(f"{what} contain non-finite values: {array.tolist()}")
    return array


def similarity_transform(src, dst) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst`` (Umeyama).

    Both ``(N, 2)``; returns the 2x3 matrix ``M`` with ``dst ~= M @ [x, y, 1]``. Reflections are excluded,
    so a mirrored face is not "aligned" by flipping it.
    """
    src = _as_points(src, "source points")
    dst = _as_points(dst, "destination points")
    if src.shape != dst.shape:
        raise AlignmentError(f"source {src.shape} and destination {dst.shape} points differ in shape")
    mean_src, mean_dst = src.mean(axis=0), dst.mean(axis=0)
    centred_src, centred_dst = src - mean_src, dst - mean_dst
    variance_src = (centred_src**2).sum() / len(src)
    if variance_src < 1e-12:
        raise AlignmentError(
            f"degenerate source points: all at one place ({mean_src.tolist()}); cannot align"
        )
    covariance = centred_dst.T @ centred_src / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / variance_src
    translation = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, translation[:, None]])


def apply_transform(matrix: np.ndarray, points) -> np.ndarray:
    """Map ``(N, 2)`` points by a 2x3 matrix."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _check_box(box) -> tuple[float, float, float, float]:
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise AlignmentError(f"a face box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if x1 <= x0 or y1 <= y0:
        raise AlignmentError(f"face box {box!r} has no area (need x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def box_crop_transform(box, size: int = CROP_SIZE) -> np.ndarray:
    """Transform that resizes ``box`` to ``size`` x ``size``: the paper's "unaligned" input.

    The box is in this module's continuous coordinates (its edges, not pixel centres: a box covering a whole
    W x H photo is ``(-0.5, -0.5, W - 0.5, H - 0.5)``); its edges land on the crop's outer edges. The box is
    simply resized, not squared (SPEC: "the detector's box crop simply resized to 112"), so a non-square box
    changes the face's aspect ratio exactly as in the paper's setting; dlib and the DFA give square or
    near-square boxes anyway.
    """
    x0, y0, x1, y1 = _check_box(box)
    scale_x, scale_y = size / (x1 - x0), size / (y1 - y0)
    # edge x0 -> -0.5 and x1 -> size - 0.5 (pixel-centre coordinates of the crop)
    return np.array([[scale_x, 0.0, -0.5 - scale_x * x0], [0.0, scale_y, -0.5 - scale_y * y0]])


def unaligned_crop(image: np.ndarray, box, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(crop, transform)``: the box resized to ``size`` (:func:`box_crop_transform`), anti-aliased.

    The one definition of the "unaligned" crop: the face pipeline (``--mode unaligned``) and the evaluation
    sweep's t=1 end (:func:`kprpe.eval.images.crop_face`) both call it, so the same photo and box give the
    same crop everywhere.
    """
    matrix = box_crop_transform(box, size)
    return warp_crop(image, matrix, size, antialias=True), matrix


def box_from_keypoints(keypoints) -> tuple[float, float, float, float]:
    """A detector-like box for a face known only by its 5 points (the template box mapped back)."""
    matrix = similarity_transform(_check_five(keypoints), ARCFACE_TEMPLATE_112)
    inverse = cv2.invertAffineTransform(matrix)
    x0, y0, x1, y1 = TEMPLATE_FACE_BOX
    corners = apply_transform(inverse, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    return float(left), float(top), float(right), float(bottom)


# Bilinear sampling only low-passes over about one photo pixel; when the crop is much coarser than the photo
# (a 4000 px photo of a face), it aliases. Below this crop-pixels-per-photo-pixel scale the photo is first
# shrunk with area averaging so the warp itself runs at about 1:1.
ANTIALIAS_BELOW_SCALE = 2 / 3


def transform_scale(matrix: np.ndarray) -> float:
    """Crop pixels per photo pixel of a 2x3 similarity (geometric mean of the two axis scales)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:, :2]))))


def downscale_for_warp(
    image: np.ndarray, matrix: np.ndarray, *, min_scale: float = ANTIALIAS_BELOW_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """``(image, matrix)``, the photo shrunk by area averaging when ``matrix`` minifies below ``min_scale``.

    The returned matrix maps the shrunk photo to the same crop pixels (pixel centres stay pixel centres:
    new pixel ``x'`` covers old ``(x' + 0.5) * W / W' - 0.5``). Without shrinking both come back as given.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    scale = transform_scale(matrix)
    if not np.isfinite(scale) or scale <= 0 or scale >= min_scale:
        return image, matrix
    height, width = image.shape[:2]
    new_width = max(1, math.ceil(width * scale))
    new_height = max(1, math.ceil(height * scale))
    if new_width >= width and new_height >= height:
        return image, matrix
    small = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)
    step_x, step_y = width / new_width, height / new_height
    # small pixel (x', y') -> photo pixel ((x' + 0.5) * step_x - 0.5, (y' + 0.5) * step_y - 0.5)
    to_photo = np.array(
        [[step_x, 0.0, 0.5 * step_x - 0.5], [0.0, step_y, 0.5 * step_y - 0.5], [0.0, 0.0, 1.0]]
    )
    return small, matrix @ to_photo


def warp_crop(
    image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE, *, antialias: bool = False
) -> np.ndarray:
    """Warp ``image`` by ``matrix`` into a ``size`` x ``size`` crop, black outside the photo.

    ``antialias``: shrink a photo much larger than the crop first (:func:`downscale_for_warp`), so fine detail
    (hair, fabric, JPEG noise) does not alias into the crop.
    """
    if antialias:
        image, matrix = downscale_for_warp(image, matrix)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def backend_aligned_face(
    crop: np.ndarray, crop_keypoints, source_keypoints, *, box=None, score: float | None = None
) -> AlignedFace:
    """An :class:`AlignedFace` from a backend's own float crop (the DFA's ``aligned_x`` and
    ``aligned_ldmks``), kept exactly for the model; ``image`` is its uint8 rendering. ``transform`` is the
    similarity fitted from the photo keypoints to the crop keypoints (for drawing and bookkeeping only)."""
    pixels = np.asarray(crop, dtype=np.float32)
    if pixels.shape != (3, CROP_SIZE, CROP_SIZE) or not np.isfinite(pixels).all():
        raise AlignmentError(
            f"a backend crop must be finite float (3, {CROP_SIZE}, {CROP_SIZE}) in [-1, 1], "
            f"got {pixels.shape}"
        )
    keypoints = _check_five(crop_keypoints)
    points = _check_five(source_keypoints)
    image = np.clip(np.rint((pixels.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return AlignedFace(
        image=np.ascontiguousarray(image),
        keypoints=keypoints,
        transform=similarity_transform(points, keypoints * CROP_SIZE),
        source_keypoints=points,
        box=_check_box(box) if box is not None else None,
        mode="aligned",
        score=score,
        pixels=pixels,
    )


def _check_five(keypoints) -> np.ndarray:
    points = _as_points(keypoints)
    if points.shape != (5, 2):
        raise AlignmentError(f"face keypoints must have shape (5, 2) in ArcFace order, got {points.shape}")
    return points


def template_alignment_error(aligned: AlignedFace) -> float:
    """Root-mean-square distance (crop pixels) between the crop keypoints and the ArcFace template."""
    return float(np.sqrt(((aligned.keypoints_px - ARCFACE_TEMPLATE_112) ** 2).sum(axis=1).mean()))


def align_face(
    image: np.ndarray,
    keypoints,
    *,
    mode: str = "aligned",
    box=None,
    score: float | None = None,
) -> AlignedFace:
    """Crop one face for the model.

    ``image``: ``(H, W, 3)`` uint8 RGB photo; ``keypoints``: ``(5, 2)`` photo pixels in ArcFace order.
    ``mode``: ``aligned`` — similarity transform to the ArcFace template (docs/face.md); ``unaligned`` — the
    box crop resized to 112 (box derived from the keypoints when not given), keypoints land wherever they are;
    ``prealigned`` — the image already is the 112x112 crop, used as is.
    """
    if mode not in ALIGN_MODES:
        raise AlignmentError(f"unknown alignment mode {mode!r}; choose one of {ALIGN_MODES}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise AlignmentError(
            f"image must be a (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', type(image))}"
        )
    points = _check_five(keypoints)
    box_tuple = _check_box(box) if box is not None else None
    if mode == "aligned":
        matrix = similarity_transform(points, ARCFACE_TEMPLATE_112)
        crop = warp_crop(image, matrix, antialias=True)
    elif mode == "unaligned":
        if box_tuple is None:
            box_tuple = box_from_keypoints(points)
        crop, matrix = unaligned_crop(image, box_tuple)
    else:
        if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
            raise AlignmentError(
                f"mode 'prealigned' needs a {CROP_SIZE}x{CROP_SIZE} image, got "
                f"{image.shape[1]}x{image.shape[0]}; "
                "use mode 'aligned' or 'unaligned' for photos"
            )
        matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        crop = image.copy()
    crop_points = apply_transform(matrix, points)
    return AlignedFace(
        image=np.ascontiguousarray(crop),
        keypoints=crop_points / CROP_SIZE,
        transform=matrix,
        source_keypoints=points,
        box=box_tuple,
        mode=mode,
        score=score,
    )
