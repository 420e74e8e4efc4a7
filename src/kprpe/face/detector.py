"""The interface every face backend implements: photo in, faces with 5 ArcFace keypoints out.

A :class:`FaceDetector` turns an ``(H, W, 3)`` uint8 RGB photo into :class:`FaceDetection` objects: a box and
the 5 ArcFace keypoints (image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth
corner, :mod:`kprpe.keypoints`) in photo pixels. Backends, one module each:

* :mod:`kprpe.face.dlib_backend` — :class:`~kprpe.face.dlib_backend.DlibDetector`, offline dlib models.
* :mod:`kprpe.face.dfa_backend` — :class:`~kprpe.face.dfa_backend.DfaAligner`, the official CVLface
  Differentiable Face Aligner (the one published KP-RPE weights were trained with); it also hands over its
  own 112x112 crop (``FaceDetection.aligned``).
* :mod:`kprpe.face.landmark_files` — :class:`~kprpe.face.landmark_files.SuppliedLandmarks`, keypoints (and
  boxes) read from a CSV or JSON file, so any external detector can feed the pipeline.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import KprpeError

__all__ = ["FaceDetection", "FaceDetector", "MissingDependencyError", "NoFaceFound", "EXTRA_HINT"]

EXTRA_HINT = "install the optional extra: pip install 'kprpe[face]' (dlib-bin and face-recognition-models)"


class MissingDependencyError(KprpeError, ImportError):
    """An optional dependency of the face pipeline is not installed."""


class NoFaceFound(KprpeError, ValueError):
    """The detector found no face in an image (or no landmarks were supplied for it)."""


@dataclass
class FaceDetection:
    """One face in a photo: ``box`` ``(x0, y0, x1, y1)`` and ``keypoints`` ``(5, 2)`` in photo pixels.

    ``landmarks`` keeps the backend's raw points (68 or 5 for dlib) for drawing and debugging. ``aligned``:
    a backend's own crop, ``(crop (3, 112, 112) float32 RGB in [-1, 1], keypoints (5, 2) / 112)``; the
    pipeline uses it as is in ``aligned`` mode (the DFA's ``aligned_x``, ``aligned_ldmks``).
    """

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float | None = None
    landmarks: np.ndarray | None = None
    aligned: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class FaceDetector(ABC):
    """Finds faces and their 5 ArcFace keypoints in ``(H, W, 3)`` uint8 RGB photos."""

    name = "detector"

    @abstractmethod
    def detect(self, image: np.ndarray, *, source: str | os.PathLike | None = None) -> list[FaceDetection]:
        """All faces found (any order); ``source`` is the photo's path for backends that look it up."""

    @abstractmethod
    def landmarks_in_box(
        self, image: np.ndarray, box: Sequence[float], *, source: str | os.PathLike | None = None
    ) -> FaceDetection:
        """Keypoints of the face known to lie in ``box`` (used for pre-aligned crops)."""

    def detect_batch(
        self, images: Sequence[np.ndarray], *, sources: Sequence | None = None
    ) -> list[list[FaceDetection] | Exception]:
        """:meth:`detect` for many photos: per photo its faces, or the deliberate error (a
        :class:`~kprpe.errors.KprpeError` such as :class:`NoFaceFound`) it raised. Backends that run a
        network override it to batch (the DFA)."""
        out: list[list[FaceDetection] | Exception] = []
        for index, image in enumerate(images):
            try:
                out.append(self.detect(image, source=sources[index] if sources is not None else None))
            except KprpeError as exc:
                out.append(exc)
        return out

    def describe(self) -> dict:
        """A JSON-able description stored with outputs (so results say how they were made)."""
        return {"backend": self.name}
