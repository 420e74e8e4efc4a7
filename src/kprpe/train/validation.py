"""Verification pairs during training: insightface ``.bin`` files and 10-fold best-threshold accuracy.

A ``.bin`` is a pickle of ``(list of 2N encoded images, list of N bools)``; pair ``k`` is images ``2k`` and
``2k + 1``. A pickle can run code, so it is read with an unpickler that only builds lists, tuples, bytes,
bools and numpy arrays. Images are aligned 112x112 faces, so their keypoints are the ArcFace template.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import DataError, decode_image
from ..data.transforms import AugmentConfig, FaceAugment, image_to_tensor
from ..keypoints import ARCFACE_TEMPLATE_112

__all__ = ["VerificationSet", "load_verification_bin", "verification_accuracy", "evaluate_pairs"]

_ALLOWED = {
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "bool"), ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a verification file (only lists, bytes, bools and arrays are allowed)")
        return super().find_class(module, name)


@dataclass
class VerificationSet:
    name: str
    images: list[np.ndarray]  # uint8 RGB, 2N of them
    issame: np.ndarray  # (N,) bool


def load_verification_bin(path: str | os.PathLike) -> VerificationSet:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification file not found: {path}")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a verification .bin (pickle of (images, issame)): {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pair (list of encoded images, list of bools)")
    bins, issame = obj
    issame = np.asarray(list(issame), dtype=bool)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    images = [decode_image(bytes(np.asarray(b).tobytes()) if not isinstance(b, (bytes, bytearray)) else bytes(b), f"{path} image {i}") for i, b in enumerate(bins)]
    return VerificationSet(path.stem, images, issame)


def verification_accuracy(similarity: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float]:
    """Mean and std of the accuracy over ``folds`` consecutive folds (no shuffle); each fold's threshold is
    the best one on the other folds."""
    similarity = np.asarray(similarity, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = len(issame)
    folds = max(2, min(folds, n))
    thresholds = np.arange(-1.0, 1.0 + 1e-9, 0.005)
    bounds = np.linspace(0, n, folds + 1).astype(int)
    accs = []
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k] : bounds[k + 1]] = True
        if not test.any():
            continue
        train_acc = [((similarity[~test] >= t) == issame[~test]).mean() for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(((similarity[test] >= best) == issame[test]).mean())
    return float(np.mean(accs)), float(np.std(accs))


@torch.no_grad()
def evaluate_pairs(model, vset: VerificationSet, *, image_size: int, batch_size: int = 128, flip: bool = True, device=None) -> tuple[float, float]:
    """Embed every image (template keypoints, flip-sum TTA) and return the verification accuracy."""
    from ..inference import embed

    resize = FaceAugment(AugmentConfig.disabled(), image_size)
    template = (ARCFACE_TEMPLATE_112 / 112.0).astype(np.float32)
    tensors, kps = [], []
    for img in vset.images:
        out, kp = resize(img, template, None)
        tensors.append(image_to_tensor(out))
        kps.append(torch.from_numpy(kp))
    was_training = model.training
    unit, _ = embed(model, torch.stack(tensors), torch.stack(kps), flip=flip, batch_size=batch_size, device=device)
    model.train(was_training)
    sims = (unit[0::2] * unit[1::2]).sum(dim=1).numpy()
    return verification_accuracy(sims, vset.issame)
