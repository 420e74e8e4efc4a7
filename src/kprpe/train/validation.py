"""Verification during training: the evaluation's ``.bin`` reader and 10-fold accuracy, called, not copied.

As arcface_torch's callbacks call its ``eval.verification``, the trainer calls :mod:`kprpe.eval`: the same
restricted unpickler (no global is ever resolved), the same face loading and the same
:func:`~kprpe.eval.metrics.kfold_accuracy` (insightface threshold grid, ``score > threshold``), so a number
logged while training is the number ``kprpe eval verify --keypoints template`` reports for that checkpoint.
Images of a ``.bin`` are aligned faces, so their keypoints are the ArcFace template.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

from ..eval.binfile import VerificationBin, read_verification_bin
from ..eval.embedding import embed_faces
from ..eval.metrics import kfold_accuracy
from ..eval.verification import bin_face_source, pair_scores

__all__ = ["load_verification_bin", "verification_accuracy", "validation_accuracy"]

MAX_FOLDS = 10


def load_verification_bin(path: str | os.PathLike) -> VerificationBin:
    """Read a ``.bin`` set with the evaluation's reader (:func:`kprpe.eval.read_verification_bin`)."""
    return read_verification_bin(path)


def verification_accuracy(
    similarity: np.ndarray, issame: np.ndarray, folds: int = MAX_FOLDS
) -> tuple[float, float]:
    """Mean and std of the 10-fold accuracy (:func:`kprpe.eval.kfold_accuracy`); sets with fewer pairs than
    folds use one fold per pair."""
    result = kfold_accuracy(similarity, issame, n_folds=max(2, min(folds, len(issame))))
    return result.accuracy_mean, result.accuracy_std


def validation_accuracy(model: nn.Module, vset: VerificationBin, *, image_size: int, batch_size: int = 128,
                   flip: bool = True, device=None) -> tuple[float, float]:
    """Embed every image of ``vset`` (template keypoints, flip-sum TTA) and return its verification accuracy
    (mean, std); the model's train/eval mode is restored afterwards."""
    source = bin_face_source(vset, vset.path or vset.name, "template", image_size=image_size)
    was_training = model.training
    try:
        unit, _ = embed_faces(model, source, flip=flip, batch_size=batch_size, device=device, progress=False)
    finally:
        model.train(was_training)
    scores = pair_scores(unit, np.arange(0, len(vset), 2), np.arange(1, len(vset), 2))
    return verification_accuracy(scores, vset.issame)
