"""Landmark files: every reader and writer of the 5-point files that training and evaluation share.

* **Normalised CSV** (``kprpe landmarks`` writes it; training and ``kprpe eval verify`` read it): an optional
  header ``idx,ldmk_0,...,ldmk_9`` and rows ``idx, x0, y0, ..., x4, y4`` (commas or white space). Coordinates
  are divided by the stored image's width (x) and height (y), in the OpenCV pixel convention of
  :mod:`kprpe.keypoints`. ``idx`` is the 0-based sample index of the data set (RecordIO: position among the
  image records in key order; image folder: position in the sorted listing; ``.bin``: image position
  0..2N-1). A sample without a row has no landmarks.
* **Pixel list** (insightface IJB ``*_name_5pts_score.txt``): rows ``image_name x0 y0 ... x4 y4 [score]``,
  white space or comma separated, pixel coordinates in that image.

Files that name photos by path, with optional boxes (``kprpe align --landmarks``), are read by
:mod:`kprpe.face.landmark_files`. Every error is a :class:`LandmarkFileError` naming ``file:line``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import KprpeError
from .files import write_csv

__all__ = [
    "LandmarkFileError",
    "landmark_columns",
    "write_landmarks",
    "read_landmark_rows",
    "read_landmarks",
    "read_pixel_landmarks",
    "LANDMARK_FORMATS",
    "landmark_file_format",
    "require_landmark_format",
]

# Normalised coordinates of a face in frame lie near [0, 1]; far outside means pixels were written.
_MAX_NORMALISED = 4.0


class LandmarkFileError(KprpeError, ValueError):
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


def _fields(line: str) -> list[str]:
    return line.replace(",", " ").split()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _LandmarkText:
    """Lines of a landmark file; a file that is not UTF-8 text is a :class:`LandmarkFileError`, not a
    ``UnicodeDecodeError`` from the middle of a loop."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise LandmarkFileError(f"landmark file not found: {path}")
        self.path = path

    def __enter__(self):
        try:
            self.lines = self.path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise LandmarkFileError(f"landmark file {self.path} is not UTF-8 text ({exc})") from None
        return self.lines

    def __exit__(self, *exc) -> None:
        return None


def _open(path: Path) -> _LandmarkText:
    return _LandmarkText(path)


def read_landmark_rows(path: str | os.PathLike, num_keypoints: int = 5) -> dict[int, np.ndarray]:
    """``idx -> (K, 2)`` normalised keypoints (float64) of a normalised CSV."""
    path = Path(path)
    expected = landmark_columns(num_keypoints)
    out: dict[int, np.ndarray] = {}
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = _fields(line)
            if not fields:
                continue
            if not out and not _is_number(fields[0]):  # the header
                if fields[: len(expected)] != expected:
                    raise LandmarkFileError(
                        f"{path}:{lineno}: header must start with {','.join(expected)}, got "
                        f"{','.join(fields)}"
                    )
                continue
            if len(fields) != len(expected):
                raise LandmarkFileError(
                    f"{path}:{lineno}: expected {len(expected)} fields (idx, x0, y0, ..., "
                    f"x{num_keypoints - 1}, y{num_keypoints - 1}), got {len(fields)}"
                )
            try:
                idx = int(float(fields[0]))
                values = np.array([float(v) for v in fields[1:]], dtype=np.float64)
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{lineno}: not a number: {exc}") from None
            if idx < 0:
                raise LandmarkFileError(f"{path}:{lineno}: idx {idx} is negative")
            if not np.all(np.isfinite(values)):
                raise LandmarkFileError(f"{path}:{lineno}: landmark values must be finite, got {fields[1:]}")
            if np.abs(values).max() > _MAX_NORMALISED:
                raise LandmarkFileError(
                    f"{path}:{lineno}: coordinate {np.abs(values).max():.3g} is not normalised (expected "
                    "~[0, 1]); "
                    "pixel landmarks belong in the 'name x0 y0 ...' format"
                )
            if idx in out:
                raise LandmarkFileError(f"{path}:{lineno}: index {idx} appears twice")
            out[idx] = values.reshape(num_keypoints, 2)
    if not out:
        raise LandmarkFileError(f"{path}: no landmark rows")
    return out


def read_landmarks(
    path: str | os.PathLike, num_samples: int | None = None, num_keypoints: int = 5
) -> np.ndarray:
    """``(num_samples, K, 2)`` float32 keypoints of a normalised CSV; samples without a row are NaN (the
    caller decides what a missing row means)."""
    path = Path(path)
    rows = read_landmark_rows(path, num_keypoints)
    if num_samples is not None:
        outside = [i for i in rows if i >= num_samples]
        if outside:
            raise LandmarkFileError(
                f"{path}: idx {min(outside)} is outside the data set (0..{num_samples - 1})")
    size = num_samples if num_samples is not None else max(rows) + 1
    out = np.full((size, num_keypoints, 2), np.nan, dtype=np.float32)
    for idx, values in rows.items():
        out[idx] = values.astype(np.float32)
    return out


def read_pixel_landmarks(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``name -> (5, 2)`` pixel landmarks and ``name -> score`` (1.0 when the column is absent)."""
    path = Path(path)
    points: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = _fields(line)
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (11, 12):
                raise LandmarkFileError(
                    f"{path}:{lineno}: expected 'name x0 y0 ... x4 y4 [score]' (11 or 12 fields), got "
                    f"{len(fields)}"
                )
            try:
                values = np.array([float(v) for v in fields[1:11]], dtype=np.float64)
                score = float(fields[11]) if len(fields) == 12 else 1.0
            except ValueError as exc:
                raise LandmarkFileError(f"{path}:{lineno}: {exc}") from None
            if not np.all(np.isfinite(values)):
                raise LandmarkFileError(f"{path}:{lineno}: non-finite coordinate")
            points[fields[0]] = values.reshape(5, 2)
            scores[fields[0]] = score
    if not points:
        raise LandmarkFileError(f"{path}: no landmark rows")
    return points, scores


# The three landmark files commands read, by the name docs/cli.md gives them; a command names the ones it
# reads and a file of another kind is refused by its content, naming both (one --landmarks, detected).
LANDMARK_FORMATS = {
    "photo-list": "photos by name: a CSV with columns file,x0,y0,..,x4,y4 (optional score, box_*) or JSON "
    "{file: face}, pixels (kprpe.face.landmark_files)",
    "index-csv": "samples by index: rows idx,ldmk_0,..,ldmk_9 normalised to the image (kprpe landmarks "
    "writes it)",
    "pixel-list": "images by name: rows 'image x0 y0 .. x4 y4 [score]' in pixels, no header (insightface IJB "
    "*_name_5pts_score.txt)",
}


def landmark_file_format(path: str | os.PathLike) -> str:
    """Which of :data:`LANDMARK_FORMATS` a file holds, from its first line that is not blank or a comment."""
    path = Path(path)
    with _open(path) as lines:
        first = next((line.strip() for line in lines if line.strip() and not line.startswith("#")), "")
    if not first:
        raise LandmarkFileError(f"{path}: no landmark rows")
    if first[0] in "{[":
        return "photo-list"  # JSON
    fields = [f.strip().lower() for f in _fields(first)]
    if fields[0] == "idx":
        return "index-csv"
    if "file" in fields:
        return "photo-list"
    if _is_number(fields[0]):  # a header-less index CSV starts with a sample index; the others with a name
        return "index-csv"
    return "pixel-list"


def require_landmark_format(
    path: str | os.PathLike, accepted: tuple[str, ...], *, option: str = "--landmarks"
) -> str:
    """The format of ``path`` if it is one of ``accepted``; otherwise a :class:`LandmarkFileError` that names
    the format found and the one(s) this command reads. A missing file is left to the reader's own error."""
    if not Path(path).is_file():
        return ""
    found = landmark_file_format(path)
    if found not in accepted:
        wanted = "; or ".join(f"{name} ({LANDMARK_FORMATS[name]})" for name in accepted)
        raise LandmarkFileError(
            f"{option} {path} is a {found} file ({LANDMARK_FORMATS[found]}); this command reads {wanted} "
            "(docs/cli.md, landmark files)"
        )
    return found
