"""Evaluation: verification (.bin 10-fold, custom pairs), IJB-B/C 1:1, identification, TinyFace, the CVLface
evaluation-toolkit layout, and the alignment-robustness sweep. The command line is ``kprpe eval``; see
docs/eval.md."""

from __future__ import annotations

from .binfile import (
    BinFormatError,
    RestrictedUnpickler,
    UnsafePickleError,
    VerificationBin,
    read_verification_bin,
    write_verification_bin,
)
from .embedding import EmbeddingCache, FaceSource, embed_faces, embed_with_cache
from .geometry import (
    CropParams,
    aligned_crop_params,
    box_crop_params,
    box_from_landmarks,
    crop_matrix,
    interpolate_crop,
    warp_face,
)
from .ijb import read_ijb_meta, template_features, template_pair_scores
from .images import crop_face, read_pairs_csv, scan_identity_folders
from .metrics import (
    DEFAULT_FAR_TARGETS,
    TAR_FAR_CONVENTIONS,
    cmc_ranks,
    kfold_accuracy,
    open_set_dir_at_fpir,
    rank_accuracy,
    roc_auc,
    roc_curve,
    roc_curve_dropped,
    tar_at_far,
    val_at_far,
)
from .runs import (
    EvalSettings,
    ModelHandle,
    evaluate_bins,
    evaluate_identification,
    evaluate_ijb,
    evaluate_pairs,
    robustness_sweep,
)
from .tinyface import TinyFaceProtocol, tinyface_identification
from .toolkit import (
    ToolkitFormatError,
    evaluate_tinyface,
    evaluate_toolkit,
    open_toolkit_set,
    read_toolkit_metadata,
)
from .verification import pair_scores, verification_metrics

__all__ = [
    "BinFormatError",
    "CropParams",
    "DEFAULT_FAR_TARGETS",
    "EmbeddingCache",
    "EvalSettings",
    "FaceSource",
    "ModelHandle",
    "TAR_FAR_CONVENTIONS",
    "TinyFaceProtocol",
    "ToolkitFormatError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "VerificationBin",
    "aligned_crop_params",
    "box_crop_params",
    "box_from_landmarks",
    "cmc_ranks",
    "crop_face",
    "crop_matrix",
    "embed_faces",
    "embed_with_cache",
    "evaluate_bins",
    "evaluate_identification",
    "evaluate_ijb",
    "evaluate_pairs",
    "evaluate_tinyface",
    "evaluate_toolkit",
    "interpolate_crop",
    "kfold_accuracy",
    "open_set_dir_at_fpir",
    "open_toolkit_set",
    "pair_scores",
    "rank_accuracy",
    "read_ijb_meta",
    "read_pairs_csv",
    "read_toolkit_metadata",
    "read_verification_bin",
    "robustness_sweep",
    "roc_auc",
    "roc_curve",
    "roc_curve_dropped",
    "scan_identity_folders",
    "tar_at_far",
    "template_features",
    "template_pair_scores",
    "tinyface_identification",
    "val_at_far",
    "verification_metrics",
    "warp_face",
    "write_verification_bin",
]
