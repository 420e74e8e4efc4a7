"""Face backends chosen by name: what a command, the HTTP service or a landmark job asks for (``dlib``,
``dfa``, or a landmark file), built in one place with one set of error messages.

:func:`make_detector` gives a :class:`~kprpe.face.detector.FaceDetector` for :class:`FacePipeline`;
:func:`dlib_keypoint_function` and :func:`dfa_keypoint_function` give ``rgb image -> (5, 2) normalised
keypoints or None`` for landmark files (:func:`kprpe.data.pack.compute_landmarks`).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import KprpeError
from .detector import FaceDetector, MissingDependencyError

__all__ = [
    "ALIGNER_CHOICES",
    "BackendChoiceError",
    "dfa_keypoint_function",
    "dlib_keypoint_function",
    "make_detector",
]

ALIGNER_CHOICES = ("dlib", "dfa")


class BackendChoiceError(KprpeError, ValueError):
    """Backend options that contradict each other, or a backend that cannot start (the message says which)."""


def make_detector(
    aligner: str = "dlib",
    *,
    landmarks: str | os.PathLike | None = None,
    landmarks_normalized: bool = False,
    detector: str = "hog",
    landmark_model: str = "68",
    upsample: int | str = "auto",
    min_score: float = 0.0,
    aligner_weights: str | os.PathLike | None = None,
    min_aligner_score: float | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> FaceDetector:
    """The backend for ``aligner`` (``dlib`` or ``dfa``), or the keypoints of a ``landmarks`` file (any
    external detector). The dlib options (``detector``, ``landmark_model``, ``upsample``, ``min_score``) and
    the DFA's (``aligner_weights``, ``min_aligner_score``, ``device``, ``batch_size``) are named as the
    command-line options they come from, and so are the errors."""
    if aligner not in ALIGNER_CHOICES:
        raise BackendChoiceError(f"unknown aligner {aligner!r}; choose one of {ALIGNER_CHOICES}")
    if aligner == "dfa":
        if landmarks:
            raise BackendChoiceError("--landmarks and --aligner dfa both give keypoints; choose one")
        from .dfa_backend import load_dfa_backend

        return load_dfa_backend(
            aligner_weights, device=device, min_score=min_aligner_score, batch_size=batch_size
        )
    if min_aligner_score is not None:
        raise BackendChoiceError(
            "--min-aligner-score applies to --aligner dfa; dlib's threshold is --min-score"
        )
    if landmarks:
        from .landmark_files import SuppliedLandmarks

        return SuppliedLandmarks.from_file(landmarks, normalized=landmarks_normalized)
    from .dlib_backend import DlibDetector

    return DlibDetector(detector, landmark_model, upsample=upsample, min_score=min_score)


def dlib_keypoint_function(mode: str = "auto", detector: str = "hog", landmark_model: str = "68"):
    """A function ``rgb image -> (5, 2) normalised keypoints or None`` backed by dlib.

    ``mode``: ``detect`` (largest detected face), ``crop`` (the image *is* the face crop: landmarks inside the
    whole-image box — the right choice for aligned training sets), ``auto`` (detect, else crop)."""
    from .dlib_backend import DlibDetector

    try:
        backend = DlibDetector(detector, landmark_model)
    except (MissingDependencyError, ValueError) as exc:
        raise BackendChoiceError(f"cannot start the landmark backend: {exc}") from None

    def detect(image: np.ndarray):
        h, w = image.shape[:2]
        face = None
        if mode in ("detect", "auto"):
            faces = backend.detect(image)
            if faces:
                face = max(faces, key=lambda f: f.area)
        if face is None and mode in ("crop", "auto"):
            face = backend.landmarks_in_box(image, (0.0, 0.0, float(w), float(h)))
        if face is None:
            return None
        return np.asarray(face.keypoints, dtype=np.float64) / np.array([w, h])

    return detect


def dfa_keypoint_function(
    weights: str | os.PathLike | None = None, device: str = "cpu", min_score: float | None = None
):
    """``rgb image -> (5, 2) normalised keypoints or None`` from the official DFA aligner, with ``.batch``
    (photos of one shape in one forward pass). Square images (aligned training crops) get the official
    ``orig_pred_ldmks``; others the landmarks mapped back to their pixels, divided by width and height.
    ``min_score``: below it an image counts as "no face" (the DFA itself always answers)."""
    from .dfa_backend import load_dfa_backend

    # align() reports every score; min_score (checked by the loader) is applied below: a low score, no row
    backend = load_dfa_backend(weights, device=device, min_score=min_score, batch_size=64)

    def batch(images: list[np.ndarray]) -> list:
        out = []
        for image, result in zip(images, backend.align(images), strict=True):
            if min_score is not None and result.score < min_score:
                out.append(None)
            elif result.frame_keypoints is not None:
                out.append(result.frame_keypoints)
            else:
                h, w = image.shape[:2]
                out.append(result.keypoints / np.array([w, h]))
        return out

    def detect(image: np.ndarray):
        return batch([image])[0]

    detect.batch = batch
    return detect
