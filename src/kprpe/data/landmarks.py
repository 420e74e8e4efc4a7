"""Landmark files: one CSV per data set, ``idx,ldmk_0,...,ldmk_9`` = sample index, then x0,y0,...,x4,y4.

Coordinates are normalised by the stored image's width (x) and height (y), in the OpenCV pixel convention of
:mod:`kprpe.keypoints`. ``idx`` is the 0-based sample index of the data set (RecordIO: position among the image
records in key order; image folder: position in the sorted listing) — the same index :class:`FaceDataset`
uses.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from ..files import write_csv

__all__ = ["LandmarkFileError", "landmark_columns", "write_landmarks", "read_landmarks"]


class LandmarkFileError(ValueError):
    """A landmark file that cannot be used; the message names the file, line and problem."""


def landmark_columns(num_keypoints: int = 5) -> list[str]:
    return ["idx"] + [f"ldmk_{i}" for i in range(2 * num_keypoints)]


def write_landmarks(path: str | os.PathLike, indices, keypoints) -> Path:
    """Write ``keypoints (N, K, 2)`` for sample ``indices (N,)`` atomically. Rows with NaN are not written
    (a missing row means "no landmarks for this sample")."""
    path = Path(path)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    indices = np.asarray(indices, dtype=np.int64)
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must have shape (N, K, 2), got {keypoints.shape}")
    if indices.shape != (keypoints.shape[0],):
        raise ValueError(f"indices must have shape ({keypoints.shape[0]},), got {indices.shape}")
    rows = [
        [idx] + [f"{v:.6f}" for v in kp.reshape(-1)]
        for idx, kp in zip(indices.tolist(), keypoints, strict=True)
        if np.isfinite(kp).all()
    ]
    write_csv(path, landmark_columns(keypoints.shape[1]), rows)
    return path


def read_landmarks(path: str | os.PathLike, num_samples: int | None = None, num_keypoints: int = 5) -> np.ndarray:
    """``(num_samples, K, 2)`` float32 keypoints; samples without a row are NaN (the caller decides what a
    missing row means). Raises :class:`LandmarkFileError` for malformed files, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise LandmarkFileError(f"landmark file not found: {path}")
    expected = landmark_columns(num_keypoints)
    rows: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LandmarkFileError(f"{path} is empty; expected a header {','.join(expected)}")
        header = [h.strip() for h in header]
        if header[: len(expected)] != expected:
            raise LandmarkFileError(f"{path}:1: header must start with {','.join(expected)}, got {','.join(header)}")
        for line_no, row in enumerate(reader, 2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(expected):
                raise LandmarkFileError(f"{path}:{line_no}: expected {len(expected)} columns, got {len(row)}")
            try:
                idx = int(row[0])
                values = [float(v) for v in row[1 : len(expected)]]
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{line_no}: not a number: {exc}") from exc
            if idx < 0 or (num_samples is not None and idx >= num_samples):
                raise LandmarkFileError(f"{path}:{line_no}: idx {idx} is outside the data set (0..{(num_samples or 0) - 1})")
            if not all(math.isfinite(v) for v in values):
                raise LandmarkFileError(f"{path}:{line_no}: landmark values must be finite, got {row[1:len(expected)]}")
            if idx in rows:
                raise LandmarkFileError(f"{path}:{line_no}: idx {idx} appears twice")
            rows[idx] = values
    size = num_samples if num_samples is not None else (max(rows) + 1 if rows else 0)
    out = np.full((size, num_keypoints, 2), np.nan, dtype=np.float32)
    for idx, values in rows.items():
        out[idx] = np.asarray(values, dtype=np.float32).reshape(num_keypoints, 2)
    return out
