"""The face pipeline: photo -> face box -> 5 keypoints -> 112x112 crop -> KP-RPE embedding -> similarity.

Importing this package does not import dlib; the dlib backend loads it on first use (``pip install
'kprpe[face]'``). See docs/face.md.
"""

from __future__ import annotations

from ..images import ImageLoadError, expand_image_paths, load_image
from ..landmarks import LandmarkFileError
from .align import (
    ALIGN_MODES,
    CROP_SIZE,
    AlignedFace,
    AlignmentError,
    align_face,
    box_crop_transform,
    box_from_keypoints,
    similarity_transform,
    template_alignment_error,
    unaligned_crop,
)
from .detector import FaceDetection, FaceDetector, MissingDependencyError, NoFaceFound
from .dfa_backend import DfaAligner
from .dlib_backend import DlibDetector
from .draw import draw_keypoints, side_by_side
from .embedder import FaceEmbedder
from .landmark_files import SuppliedLandmarks
from .pipeline import (
    DEFAULT_THRESHOLD,
    BatchResult,
    FacePipeline,
    FaceRecord,
    VerifyResult,
    cosine_similarity,
    verify,
)

__all__ = [
    "ALIGN_MODES",
    "CROP_SIZE",
    "DEFAULT_THRESHOLD",
    "AlignedFace",
    "DfaAligner",
    "AlignmentError",
    "BatchResult",
    "DlibDetector",
    "FaceDetection",
    "FaceDetector",
    "FaceEmbedder",
    "FacePipeline",
    "FaceRecord",
    "ImageLoadError",
    "LandmarkFileError",
    "MissingDependencyError",
    "NoFaceFound",
    "SuppliedLandmarks",
    "VerifyResult",
    "align_face",
    "box_crop_transform",
    "box_from_keypoints",
    "cosine_similarity",
    "draw_keypoints",
    "expand_image_paths",
    "load_image",
    "side_by_side",
    "similarity_transform",
    "template_alignment_error",
    "unaligned_crop",
    "verify",
]
