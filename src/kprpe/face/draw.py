"""Pictures for people: crops with their keypoints, and side-by-side verification results."""

from __future__ import annotations

import cv2
import numpy as np

from .align import AlignedFace

__all__ = ["KEYPOINT_COLOURS", "draw_keypoints", "side_by_side"]

# RGB colours for image-left eye, image-right eye, nose, image-left mouth, image-right mouth.
KEYPOINT_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255))


def draw_keypoints(face: AlignedFace, scale: int = 2) -> np.ndarray:
    """The crop enlarged ``scale`` times with its 5 keypoints drawn (colours in :data:`KEYPOINT_COLOURS`)."""
    size = face.image.shape[0] * scale
    canvas = cv2.resize(face.image, (size, size), interpolation=cv2.INTER_NEAREST).copy()
    for (x, y), colour in zip(face.keypoints_px, KEYPOINT_COLOURS, strict=True):
        # crop pixel centre x maps to (x + 0.5) * scale - 0.5 in the enlarged image
        centre = (round((x + 0.5) * scale - 0.5), round((y + 0.5) * scale - 0.5))
        cv2.circle(canvas, centre, max(2, scale + 1), colour, thickness=-1, lineType=cv2.LINE_AA)
        cv2.circle(canvas, centre, max(2, scale + 1), (0, 0, 0), thickness=1, lineType=cv2.LINE_AA)
    return canvas


def side_by_side(
    face_a: AlignedFace, face_b: AlignedFace, similarity: float, same: bool, threshold: float
) -> np.ndarray:
    """Both crops with keypoints, and the score under them, as one RGB image."""
    left, right = draw_keypoints(face_a), draw_keypoints(face_b)
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    top = np.hstack([left, gap, right])
    footer = np.full((56, top.shape[1], 3), 255, np.uint8)
    verdict = "same person" if same else "different people"
    colour = (0, 140, 0) if same else (200, 0, 0)
    cv2.putText(
        footer,
        f"similarity {similarity:+.4f}",
        (8, 22),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.6,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    cv2.putText(
        footer,
        f"{verdict} (threshold {threshold:.3f})",
        (8, 46),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        colour,
        1,
        cv2.LINE_AA,
    )
    return np.vstack([top, footer])
