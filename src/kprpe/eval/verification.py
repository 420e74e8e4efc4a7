"""1:1 verification on pairs: insightface ``.bin`` sets and custom pairs, all scored the same way."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..images import decode_image
from .binfile import VerificationBin
from .embedding import FaceSource, file_fingerprint
from .landmarks import LandmarkBackend, backend_tag, face_backend_available, indexed_keypoints
from .metrics import DEFAULT_FAR_TARGETS, kfold_accuracy, roc_auc, roc_curve, tar_at_far, val_at_far

__all__ = [
    "KEYPOINT_SOURCES",
    "resolve_keypoint_source",
    "bin_face_source",
    "pair_scores",
    "summarize_roc",
    "verification_metrics",
]

KEYPOINT_SOURCES = ("auto", "file", "backend", "template")


def resolve_keypoint_source(requested: str, landmarks: str | os.PathLike | None,
                            backend: LandmarkBackend | None = None) -> str:
    """``auto`` -> ``file`` when a landmark file is given, else ``backend`` when ``kprpe.face`` offers
    ``backend`` (default dlib; the DFA aligner with ``--aligner dfa``, see :class:`LandmarkBackend`), else
    ``template`` (with a warning: only right for faces really aligned to the ArcFace template)."""
    if requested not in KEYPOINT_SOURCES:
        raise ValueError(f"keypoint source must be one of {KEYPOINT_SOURCES}, got {requested!r}")
    if requested == "file" and landmarks is None:
        raise ValueError("keypoint source 'file' needs a landmark file (--landmarks)")
    if requested != "auto":
        return requested
    if landmarks is not None:
        return "file"
    if face_backend_available(backend):
        return "backend"
    warnings.warn("no landmark file and no kprpe.face landmark backend: using the ArcFace template keypoints",
                  stacklevel=2)
    return "template"


def bin_face_source(vb: VerificationBin, path: str | os.PathLike, keypoint_source: str,
                    landmarks: str | os.PathLike | None = None, *, image_size: int = 112,
                    backend: LandmarkBackend | None = None) -> FaceSource:
    """Faces of a ``.bin`` set (decoded per batch, resized to ``image_size``) with keypoints from
    ``keypoint_source`` (``backend``: from ``backend``, default dlib). ``path`` names the set in messages
    and, when it is a file, keys the cache."""
    keypoints = indexed_keypoints(keypoint_source, landmarks, len(vb), backend=backend)

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([decode_image(vb.encoded_images[i], where=f"{path} image {i}", size=image_size)
                           for i in range(start, stop)])
        return images, keypoints(start, stop, images)

    fp = f"bin:{file_fingerprint(path) if Path(path).is_file() else vb.name}|kp:{keypoint_source}"
    if keypoint_source == "backend":
        fp += backend_tag(backend)
    if image_size != 112:
        fp += f"|size:{image_size}"
    if landmarks is not None and keypoint_source == "file":
        fp += f"|{file_fingerprint(landmarks)}"
    return FaceSource(count=len(vb), load=load, fingerprint=fp)


def pair_scores(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit embeddings for pairs ``(first[k], second[k])``."""
    return np.einsum("ij,ij->i", embeddings[first], embeddings[second]).astype(np.float64)


def summarize_roc(far: np.ndarray, tar: np.ndarray, max_points: int = 400) -> dict:
    """A ROC thinned for JSON/plots: points spread evenly in log(FAR), plus both ends."""
    if far.size <= max_points:
        idx = np.arange(far.size)
    else:
        positive = far > 0
        grid = np.logspace(np.log10(far[positive].min()), 0, max_points)
        idx = np.unique(np.r_[0, np.searchsorted(far, grid, side="right") - 1, far.size - 1])
    return dict(far=far[idx].tolist(), tar=tar[idx].tolist())


def verification_metrics(scores: np.ndarray, labels: np.ndarray, *, n_folds: int = 10,
                         far_targets=DEFAULT_FAR_TARGETS, val_far: float = 1e-3,
                         tar_far_convention: str = "insightface") -> dict:
    """Everything a verification report shows: 10-fold accuracy, VAL@FAR, TAR@FAR (in ``tar_far_convention``,
    recorded in the result), AUC and the full ROC."""
    labels = np.asarray(labels, dtype=bool)
    far, tar, _ = roc_curve(scores, labels)
    out = dict(
        num_pairs=int(labels.size),
        num_genuine=int(labels.sum()),
        num_impostor=int((~labels).sum()),
        auc=roc_auc(far, tar),
        tar_at_far=tar_at_far(scores, labels, far_targets, tar_far_convention),
        tar_at_far_convention=tar_far_convention,
        roc=summarize_roc(far, tar),
    )
    if labels.size >= n_folds:
        out["kfold"] = kfold_accuracy(scores, labels, n_folds=n_folds).to_dict()
        out["kfold"]["n_folds"] = n_folds
        out["val_at_far"] = val_at_far(scores, labels, val_far, n_folds=n_folds).to_dict()
    return out
