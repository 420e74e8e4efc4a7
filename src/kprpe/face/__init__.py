"""The face pipeline: photo -> face box -> 5 keypoints -> 112x112 crop -> KP-RPE embedding -> similarity.

Importing this package imports nothing else: each name below loads its module when first read (torch with
the embedder, dlib with its backend: ``pip install 'kprpe[face]'``). See docs/face.md.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the module that defines it, imported the first time the name is read
_EXPORTS = {
    "ImageLoadError": "..images",
    "expand_image_paths": "..images",
    "load_image": "..images",
    "LandmarkFileError": "..landmarks",
    "ALIGN_MODES": ".align",
    "CROP_SIZE": ".align",
    "AlignedFace": ".align",
    "AlignmentError": ".align",
    "align_face": ".align",
    "box_crop_transform": ".align",
    "box_from_keypoints": ".align",
    "similarity_transform": ".align",
    "template_alignment_error": ".align",
    "unaligned_crop": ".align",
    "FaceDetection": ".detector",
    "FaceDetector": ".detector",
    "MissingDependencyError": ".detector",
    "NoFaceFound": ".detector",
    "DfaAligner": ".dfa_backend",
    "DlibDetector": ".dlib_backend",
    "draw_keypoints": ".draw",
    "side_by_side": ".draw",
    "FaceEmbedder": ".embedder",
    "SuppliedLandmarks": ".landmark_files",
    "DEFAULT_THRESHOLD": ".pipeline",
    "BatchResult": ".pipeline",
    "FacePipeline": ".pipeline",
    "FaceRecord": ".pipeline",
    "VerifyResult": ".pipeline",
    "cosine_similarity": ".pipeline",
    "verify": ".pipeline",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
