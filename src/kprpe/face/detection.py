"""Where the face backends were imported from before each got its own module: the interface
(:mod:`.detector`), dlib (:mod:`.dlib_backend`) and supplied landmark files (:mod:`.landmark_files`). Kept so
that ``from kprpe.face.detection import ...`` keeps working."""

from __future__ import annotations

from ..landmarks import LandmarkFileError
from .detector import FaceDetection, FaceDetector, MissingDependencyError, NoFaceFound
from .dlib_backend import DlibDetector, arcface_points_from_68, arcface_points_from_dlib5, face_models_dir
from .landmark_files import BOX_COLUMNS, LANDMARK_COLUMNS, SuppliedLandmarks

__all__ = [
    "FaceDetection",
    "FaceDetector",
    "DlibDetector",
    "SuppliedLandmarks",
    "LandmarkFileError",
    "MissingDependencyError",
    "NoFaceFound",
    "face_models_dir",
    "arcface_points_from_68",
    "arcface_points_from_dlib5",
    "LANDMARK_COLUMNS",
    "BOX_COLUMNS",
]
