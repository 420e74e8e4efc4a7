"""Where evaluation keypoints come from: landmark files, the optional face backend, or the template.

Two file formats are read (errors name ``file:line``):

* **normalised CSV** (the training format): a header ``idx,ldmk_0,...,ldmk_9`` (optional) and rows
  ``idx, x0, y0, ..., x4, y4`` with coordinates divided by the image width/height. For a ``.bin`` set the
  index is the image's position (0..2N-1).
* **pixel list** (insightface IJB ``*_name_5pts_score.txt``): rows ``image_name x0 y0 ... x4 y4 [score]``,
  whitespace or comma separated, pixel coordinates in that image.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..keypoints import template_keypoints

__all__ = [
    "LandmarkFileError",
    "read_normalized_landmark_csv",
    "read_pixel_landmarks",
    "template_keypoints_for",
    "face_backend_landmarks",
    "face_backend_available",
]


class LandmarkFileError(ValueError):
    """A landmark file line that cannot be parsed; the message names ``file:line``."""


def _split(line: str) -> list[str]:
    return line.replace(",", " ").split()


def read_normalized_landmark_csv(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """``idx -> (5, 2)`` normalised keypoints from a CSV ``idx,ldmk_0..ldmk_9``."""
    path = Path(path)
    out: dict[int, np.ndarray] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = _split(line)
            if not fields:
                continue
            if lineno == 1 and not _is_number(fields[0]):
                continue  # header
            if len(fields) != 11:
                raise LandmarkFileError(f"{path}:{lineno}: expected 11 fields (idx, x0, y0, ..., x4, y4), got {len(fields)}")
            try:
                idx = int(float(fields[0]))
                values = np.array([float(v) for v in fields[1:]], dtype=np.float64)
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{lineno}: {exc}") from None
            if not np.all(np.isfinite(values)):
                raise LandmarkFileError(f"{path}:{lineno}: non-finite coordinate")
            if np.abs(values).max() > 4.0:
                raise LandmarkFileError(
                    f"{path}:{lineno}: coordinate {np.abs(values).max():.3g} is not normalised (expected ~[0, 1]); "
                    "pixel landmarks belong in the 'name x0 y0 ...' format"
                )
            if idx in out:
                raise LandmarkFileError(f"{path}:{lineno}: index {idx} appears twice")
            out[idx] = values.reshape(5, 2)
    if not out:
        raise LandmarkFileError(f"{path}: no landmark rows")
    return out


def read_pixel_landmarks(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``name -> (5, 2)`` pixel landmarks and ``name -> score`` (1.0 when the column is absent)."""
    path = Path(path)
    points: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = _split(line)
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (11, 12):
                raise LandmarkFileError(
                    f"{path}:{lineno}: expected 'name x0 y0 ... x4 y4 [score]' (11 or 12 fields), got {len(fields)}"
                )
            try:
                values = np.array([float(v) for v in fields[1:11]], dtype=np.float64)
                score = float(fields[11]) if len(fields) == 12 else 1.0
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{lineno}: {exc}") from None
            if not np.all(np.isfinite(values)):
                raise LandmarkFileError(f"{path}:{lineno}: non-finite coordinate")
            points[fields[0]] = values.reshape(5, 2)
            scores[fields[0]] = score
    if not points:
        raise LandmarkFileError(f"{path}: no landmark rows")
    return points, scores


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def template_keypoints_for(n: int) -> np.ndarray:
    """The ArcFace template for ``n`` images: the right keypoints when the images really are aligned to it."""
    return template_keypoints(n).numpy().astype(np.float64)


_PIPELINE = None


def face_backend_available() -> bool:
    """Whether the ``kprpe.face`` pipeline and its landmark backend (dlib) are importable."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("kprpe.face", "dlib", "face_recognition_models"))


def face_backend_landmarks(images: np.ndarray) -> np.ndarray:
    """Keypoints of pre-aligned uint8 RGB 112x112 faces ``(B, 112, 112, 3)`` from the ``kprpe.face`` pipeline
    in ``prealigned`` mode (landmarks searched in the template face box), as normalised ``(B, 5, 2)``.

    Imported lazily, so evaluation works without the face package or dlib.
    """
    global _PIPELINE
    if importlib.util.find_spec("kprpe.face") is None:
        raise RuntimeError("the landmark backend needs the kprpe.face package, which is not installed; "
                           "use --landmarks FILE or --keypoints template")
    if _PIPELINE is None:
        face = importlib.import_module("kprpe.face")
        _PIPELINE = face.FacePipeline(mode="prealigned")
    out = np.empty((images.shape[0], 5, 2), dtype=np.float64)
    for i, image in enumerate(images):
        try:
            faces = _PIPELINE.faces_in_image(np.ascontiguousarray(image))
        except ImportError as exc:  # the optional dlib backend is missing
            raise RuntimeError(f"landmark backend unavailable: {exc}") from None
        except Exception as exc:
            raise RuntimeError(f"landmark backend failed on image {i} of the batch: {exc}") from None
        out[i] = np.asarray(faces[0].keypoints, dtype=np.float64)
    return out
