"""Calibrated decision thresholds: the cosine similarity that gives a chosen false-accept rate on labelled
pairs.

``kprpe eval verify|pairs|ijb ... --calibrate FAR`` measures the threshold on the evaluation pairs and writes
it to a small JSON file beside the weights (``model.safetensors.threshold.json``, or ``threshold.json`` inside
a checkpoint folder). ``kprpe verify``, ``kprpe search query`` and ``kprpe serve`` then use it instead of the
uncalibrated default, and report which threshold they used and where it came from. A file made for other
weights (different model fingerprint) or another flip setting is ignored, with a note saying so.

Rule: "same" means ``similarity >= threshold``; the threshold is the ROC point with the best TAR whose FAR
does not exceed the target (:func:`kprpe.eval.metrics.tar_at_far` with ``convention="at_most"``), so the
measured FAR on the calibration pairs is at most the target.
"""

from __future__ import annotations

import math

import numpy as np

from ..thresholds import (
    CALIBRATION_FORMAT,
    CalibrationError,
    ThresholdChoice,
    calibration_path,
    read_calibration,
    resolve_threshold,
    write_calibration,
)

__all__ = [
    "CALIBRATION_FORMAT",
    "CalibrationError",
    "ThresholdChoice",
    "calibrate_threshold",
    "calibration_path",
    "write_calibration",
    "read_calibration",
    "resolve_threshold",
]

CALIBRATION_RULE = (
    "same if cosine similarity >= threshold; measured FAR <= target (tar_at_far method 'at_most')"
)


def calibrate_threshold(scores, labels, far_target: float) -> dict:
    """Threshold, TAR and reached FAR at ``far_target`` on labelled pair scores (True = same identity)."""
    from .metrics import tar_at_far

    far_target = float(far_target)
    if not 0.0 < far_target < 1.0:
        raise CalibrationError(f"the FAR to calibrate for must lie in (0, 1), got {far_target}")
    labels = np.asarray(labels).astype(bool).reshape(-1)
    impostors = int((~labels).sum())
    row = tar_at_far(scores, labels, [far_target], convention="at_most")[0]
    if not row["resolvable"] or not math.isfinite(row["threshold"]):
        raise CalibrationError(
            f"FAR {far_target:g} cannot be calibrated on {impostors} impostor pairs: the smallest "
            "measurable FAR "
            f"is 1/{impostors} = {1 / max(impostors, 1):.3g}; use more impostor pairs or a larger FAR"
        )
    return dict(
        far_target=far_target,
        far=float(row["far"]),
        threshold=float(row["threshold"]),
        tar=float(row["tar"]),
        num_genuine=int(labels.sum()),
        num_impostor=impostors,
        rule=CALIBRATION_RULE,
    )
