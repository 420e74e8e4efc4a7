"""Calibrated decision thresholds: the cosine similarity that gives a chosen false-accept rate on labelled pairs.

``kprpe eval verify|pairs|ijb ... --calibrate FAR`` measures the threshold on the evaluation pairs and writes it
to a small JSON file beside the weights (``model.safetensors.threshold.json``, or ``threshold.json`` inside a
checkpoint folder). ``kprpe verify``, ``kprpe search query`` and ``kprpe serve`` then use it instead of the
uncalibrated default, and report which threshold they used and where it came from. A file made for other
weights (different model fingerprint) or another flip setting is ignored, with a note saying so.

Rule: "same" means ``similarity >= threshold``; the threshold is the ROC point with the best TAR whose FAR does
not exceed the target (:func:`kprpe.eval.metrics.tar_at_far` with ``method="at_most"``), so the measured FAR on
the calibration pairs is at most the target.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError

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

CALIBRATION_FORMAT = "kprpe-threshold-v1"
CALIBRATION_RULE = "same if cosine similarity >= threshold; measured FAR <= target (tar_at_far method 'at_most')"
_FIELDS = ("model_fingerprint", "far_target", "threshold")


class CalibrationError(KprpeError):
    """A FAR target that the pairs cannot resolve, or a calibration file that is not one."""


def calibrate_threshold(scores, labels, far_target: float) -> dict:
    """Threshold, TAR and reached FAR at ``far_target`` on labelled pair scores (True = same identity)."""
    from .metrics import tar_at_far

    far_target = float(far_target)
    if not 0.0 < far_target < 1.0:
        raise CalibrationError(f"the FAR to calibrate for must lie in (0, 1), got {far_target}")
    labels = np.asarray(labels).astype(bool).reshape(-1)
    impostors = int((~labels).sum())
    row = tar_at_far(scores, labels, [far_target], method="at_most")[0]
    if not row["resolvable"] or not math.isfinite(row["threshold"]):
        raise CalibrationError(
            f"FAR {far_target:g} cannot be calibrated on {impostors} impostor pairs: the smallest measurable FAR "
            f"is 1/{impostors} = {1 / max(impostors, 1):.3g}; use more impostor pairs or a larger FAR")
    return dict(far_target=far_target, far=float(row["far"]), threshold=float(row["threshold"]), tar=float(row["tar"]),
                num_genuine=int(labels.sum()), num_impostor=impostors, rule=CALIBRATION_RULE)


def calibration_path(weights: str | os.PathLike) -> Path:
    """Where the calibration of ``weights`` lives: beside the file, or inside the checkpoint folder."""
    weights = Path(weights)
    return weights / "threshold.json" if weights.is_dir() else weights.with_name(weights.name + ".threshold.json")


def write_calibration(weights: str | os.PathLike, calibration: dict, *, model_fingerprint: str, dataset: str,
                      protocol: str, flip: bool) -> Path:
    """Write (atomically, replacing an older one) the calibration file beside ``weights``."""
    from ..files import write_json

    payload = dict(format=CALIBRATION_FORMAT, model_fingerprint=model_fingerprint, weights=str(weights),
                   dataset=dataset, protocol=protocol, flip=bool(flip), **calibration,
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return write_json(calibration_path(weights), payload)


def read_calibration(path: str | os.PathLike) -> dict:
    """Read and check a calibration file (plain JSON; raises :class:`CalibrationError` naming the file)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"calibration file {path} is not readable JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"calibration file {path} is not a {CALIBRATION_FORMAT} file")
    missing = [key for key in _FIELDS if key not in payload]
    if missing:
        raise CalibrationError(f"calibration file {path} lacks {missing}")
    threshold = payload["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise CalibrationError(f"calibration file {path}: threshold must be a cosine similarity in [-1, 1], "
                               f"got {threshold!r}")
    return payload


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold a command uses and a human-readable ``source`` (reported as ``threshold_source``)."""

    threshold: float
    source: str
    calibration: dict | None = None


def resolve_threshold(explicit: float | None, weights: str | os.PathLike | None, *, model_fingerprint: str,
                      flip: bool, default: float) -> ThresholdChoice:
    """``explicit`` (a ``--threshold``) wins; then a matching calibration file beside ``weights``; then
    ``default``. A calibration file for other weights or another flip setting is ignored, and the source
    says so."""
    if explicit is not None:
        if not math.isfinite(explicit):
            raise CalibrationError(f"--threshold must be a finite number, got {explicit}")
        return ThresholdChoice(float(explicit), "--threshold")
    note = "no calibration file"
    if weights is not None:
        path = calibration_path(weights)
        if path.is_file():
            payload = read_calibration(path)
            if payload["model_fingerprint"] != model_fingerprint:
                note = f"{path} ignored: made for other weights"
            elif bool(payload.get("flip", True)) != bool(flip):
                note = f"{path} ignored: calibrated with flip={payload.get('flip')}, running with flip={flip}"
            else:
                source = (f"calibration {path} (FAR {payload['far_target']:g} on {payload.get('dataset', '?')}, "
                          f"TAR {payload.get('tar', float('nan')):.4f})")
                return ThresholdChoice(float(payload["threshold"]), source, payload)
        else:
            note = f"no calibration file {path}"
    return ThresholdChoice(float(default), f"default (uncalibrated; {note}; run kprpe eval ... --calibrate FAR)")
