"""Where evaluation keypoints come from: landmark files, the optional face backend, or the template.

The file formats (normalised ``idx,ldmk_0..ldmk_9`` CSV, IJB pixel lists) are read by :mod:`kprpe.landmarks`,
their one home; this module re-exports those readers under the names evaluation code uses.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from ..keypoints import template_keypoints
from ..landmarks import LandmarkFileError, read_pixel_landmarks
from ..landmarks import read_landmark_rows as read_normalized_landmark_csv

__all__ = [
    "LandmarkFileError",
    "read_normalized_landmark_csv",
    "read_pixel_landmarks",
    "template_keypoints_for",
    "face_backend_landmarks",
    "face_backend_available",
]


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
