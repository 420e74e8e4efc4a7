"""Pictures for people: crops with their keypoints, and side-by-side verification results."""

from __future__ import annotations

import cv2
import numpy as np

from .align import AlignedFace

__all__ = [
    "KEYPOINT_COLOURS",
    "alignment_picture",
    "draw_keypoints",
    "draw_photo",
    "side_by_side",
    "verification_picture",
]

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


BOX_COLOUR = (118, 255, 3)  # the page's box colour


def draw_photo(photo: np.ndarray, face: AlignedFace, height: int = 320) -> np.ndarray:
    """The photo scaled to ``height`` rows with the face's detector box and its 5 photo keypoints drawn."""
    scale = height / photo.shape[0]
    width = max(1, round(photo.shape[1] * scale))
    canvas = cv2.resize(np.ascontiguousarray(photo), (width, height), interpolation=cv2.INTER_AREA).copy()
    if face.box is not None:
        x0, y0, x1, y1 = (round(v * scale) for v in face.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), BOX_COLOUR, 2, cv2.LINE_AA)
    for (x, y), colour in zip(np.asarray(face.source_keypoints), KEYPOINT_COLOURS, strict=True):
        centre = (round(x * scale), round(y * scale))
        cv2.circle(canvas, centre, 4, colour, thickness=-1, lineType=cv2.LINE_AA)
        cv2.circle(canvas, centre, 4, (0, 0, 0), thickness=1, lineType=cv2.LINE_AA)
    return canvas


def _text_lines(text: str, width_px: int, scale: float = 0.45) -> list[str]:
    """``text`` wrapped at spaces to fit ``width_px`` (OpenCV draws one line at a time)."""
    import textwrap

    char_px = cv2.getTextSize("x" * 20, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] / 20
    return textwrap.wrap(text, max(10, int(width_px / char_px))) or [""]


def verification_picture(
    photos: tuple[np.ndarray, np.ndarray],
    faces: tuple[AlignedFace, AlignedFace],
    similarity: float,
    same: bool,
    threshold: float,
    threshold_source: str,
) -> np.ndarray:
    """What ``kprpe serve``'s page shows for a verification, as one RGB image: each photo with its box and
    keypoints, the 112x112 crops the model saw (keypoints drawn), the similarity, the decision and the
    threshold with where it came from."""
    row_height = 320
    drawn = [draw_photo(photo, face, row_height) for photo, face in zip(photos, faces, strict=True)]
    gap = np.full((row_height, 12, 3), 255, np.uint8)
    top = np.hstack([drawn[0], gap, drawn[1]])
    crops = [draw_keypoints(face) for face in faces]  # 224x224 each
    crop_row = np.hstack([crops[0], np.full((crops[0].shape[0], 12, 3), 255, np.uint8), crops[1]])
    width = max(top.shape[1], crop_row.shape[1], 480)

    def pad(block: np.ndarray) -> np.ndarray:
        return np.hstack([block, np.full((block.shape[0], width - block.shape[1], 3), 255, np.uint8)])

    verdict = "same person" if same else "different people"
    lines = [(f"similarity {similarity:+.4f}: {verdict}", (0, 140, 0) if same else (200, 0, 0), 0.6)]
    for line in _text_lines(f"threshold {threshold:.4f} ({threshold_source})", width - 16):
        lines.append((line, (60, 60, 60), 0.45))
    footer = np.full((14 + 22 * len(lines), width, 3), 255, np.uint8)
    for i, (text, colour, size) in enumerate(lines):
        cv2.putText(footer, text, (8, 24 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, size, colour, 1, cv2.LINE_AA)
    spacer = np.full((10, width, 3), 255, np.uint8)
    return np.vstack([pad(top), spacer, pad(crop_row), footer])


def alignment_picture(photo: np.ndarray, face: AlignedFace, caption: str) -> np.ndarray:
    """``kprpe align --show``: the photo with the face's box and keypoints beside the 112x112 crop (2x, its
    keypoints drawn), ``caption`` under them."""
    drawn = draw_photo(photo, face, 320)
    crop = draw_keypoints(face)
    column = np.vstack([crop, np.full((320 - crop.shape[0], crop.shape[1], 3), 255, np.uint8)])
    top = np.hstack([drawn, np.full((320, 12, 3), 255, np.uint8), column])
    lines = _text_lines(caption, top.shape[1] - 16)
    footer = np.full((14 + 22 * len(lines), top.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(
            footer, text, (8, 24 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (60, 60, 60), 1, cv2.LINE_AA
        )
    return np.vstack([top, footer])
