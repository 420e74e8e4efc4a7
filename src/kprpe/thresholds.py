"""Decision thresholds for "same person": the calibration files that ``kprpe eval ... --calibrate FAR`` writes
beside the weights (``model.safetensors.threshold.json``, ``threshold.json`` inside a checkpoint folder, or
in kprpe's cache for a published checkpoint: :func:`calibration_path`),
and the choice ``kprpe verify``, ``kprpe search query`` and ``kprpe serve`` make between an explicit
threshold, such a file and the uncalibrated default — reporting which one they used and where it came from. A
file made for other weights (different model fingerprint) or another flip setting is ignored, with a note
saying so.

The measurement itself (a threshold from labelled pair scores) is
:func:`kprpe.eval.calibration.calibrate_threshold`; this module only reads and writes its results, so the face
pipeline can use them without the evaluation package.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import KprpeError

__all__ = [
    "CALIBRATION_FORMAT",
    "DEFAULT_THRESHOLD",
    "CalibrationError",
    "ThresholdChoice",
    "calibration_path",
    "write_calibration",
    "read_calibration",
    "resolve_threshold",
]

CALIBRATION_FORMAT = "kprpe-threshold-v1"
# Cosine-similarity threshold for "same person" when neither --threshold nor a calibration file gives one.
# Typical for ArcFace-style models, but it depends on the checkpoint and the false-accept rate you need:
# calibrate it on your own pairs.
DEFAULT_THRESHOLD = 0.3
_FIELDS = ("model_fingerprint", "far_target", "threshold")


class CalibrationError(KprpeError):
    """A FAR target that the pairs cannot resolve, or a calibration file that is not one."""


def calibration_path(weights: str | os.PathLike) -> Path:
    """Where the calibration of ``weights`` lives — the one answer for every command that reads or writes
    one: beside a weights file, inside a checkpoint folder, and for a published checkpoint in kprpe's cache
    (``$KPRPE_CACHE/thresholds/models--owner--name/<commit>.threshold.json``), whether it is named by repo id
    or by its snapshot folder in the Hugging Face cache (never inside that cache, nor a path made of the
    repo id)."""
    from .zoo.hub import cached_snapshot, kprpe_cache_dir, parse_repo_id, snapshot_origin

    text = os.fspath(weights)
    path = Path(text).expanduser()
    origin = snapshot_origin(path)
    parsed = None if origin is not None or path.exists() else parse_repo_id(text)
    if parsed is not None:
        folder = cached_snapshot(*parsed)
        if folder is None:
            raise CalibrationError(
                f"{text} is not in the Hugging Face cache, so it has no calibration yet: load it once (or "
                f"`kprpe fetch {parsed[0]}`) first"
            )
        origin = parsed[0], folder.name
    if origin is not None:
        repo, commit = origin
        owner, name = repo.split("/", 1)
        return kprpe_cache_dir() / "thresholds" / f"models--{owner}--{name}" / f"{commit}.threshold.json"
    return path / "threshold.json" if path.is_dir() else path.with_name(path.name + ".threshold.json")


def write_calibration(
    weights: str | os.PathLike,
    calibration: dict,
    *,
    model_fingerprint: str,
    dataset: str,
    protocol: str,
    flip: bool,
) -> Path:
    """Write (atomically, replacing an older one) the calibration file beside ``weights``."""
    from .files import write_json

    payload = dict(
        format=CALIBRATION_FORMAT,
        model_fingerprint=model_fingerprint,
        weights=str(weights),
        dataset=dataset,
        protocol=protocol,
        flip=bool(flip),
        **calibration,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
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
    if not _is_number(threshold) or not -1.0 <= threshold <= 1.0:
        raise CalibrationError(
            f"calibration file {path}: threshold must be a cosine similarity in [-1, 1], got {threshold!r}"
        )
    # every field a command reads, checked here once: a hand-edited file is refused, never half-used
    if not _is_number(payload["far_target"]) or not 0.0 < payload["far_target"] < 1.0:
        raise CalibrationError(
            f"calibration file {path}: far_target must be a false-accept rate in (0, 1), "
            f"got {payload['far_target']!r}"
        )
    for key in ("tar", "far"):
        if key in payload and (not _is_number(payload[key]) or not 0.0 <= payload[key] <= 1.0):
            raise CalibrationError(
                f"calibration file {path}: {key} must be a rate in [0, 1], got {payload[key]!r}"
            )
    if not isinstance(payload["model_fingerprint"], str):
        raise CalibrationError(
            f"calibration file {path}: model_fingerprint must be text, got {payload['model_fingerprint']!r}"
        )
    if "flip" in payload and not isinstance(payload["flip"], bool):  # "false" (a string) is not false
        raise CalibrationError(
            f"calibration file {path}: flip must be true or false, got {payload['flip']!r}"
        )
    if "dataset" in payload and not isinstance(payload["dataset"], str):
        raise CalibrationError(f"calibration file {path}: dataset must be text, got {payload['dataset']!r}")
    return payload


def _is_number(value) -> bool:
    """A finite JSON number (true/false are not numbers, NaN and infinity are not finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold a command uses and a human-readable ``source`` (reported as ``threshold_source``)."""

    threshold: float
    source: str
    calibration: dict | None = None


def resolve_threshold(
    explicit: float | None,
    weights: str | os.PathLike | None,
    *,
    model_fingerprint: str,
    flip: bool,
    default: float,
) -> ThresholdChoice:
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
            elif payload.get("flip", True) != bool(flip):
                note = f"{path} ignored: calibrated with flip={payload.get('flip')}, running with flip={flip}"
            else:
                source = (
                    f"calibration {path} (FAR {payload['far_target']:g} on {payload.get('dataset', '?')}, "
                    f"TAR {payload.get('tar', float('nan')):.4f})"
                )
                return ThresholdChoice(float(payload["threshold"]), source, payload)
        else:
            note = f"no calibration file {path}"
    return ThresholdChoice(
        float(default), f"default (uncalibrated; {note}; run kprpe eval ... --calibrate FAR)"
    )
