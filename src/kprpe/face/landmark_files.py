"""Keypoints supplied in a file, as a face backend: landmarks (and optionally boxes) per photo from a CSV or
JSON file, so any external detector (RetinaFace, SCRFD, MTCNN, ...) can feed the pipeline.

Formats (docs/face.md): CSV with a ``file`` column, ``x0,y0,...,x4,y4`` and optional ``score`` and
``box_x0,box_y0,box_x1,box_y1``; or JSON mapping each file to a face or a list of faces. Errors are
:class:`~kprpe.landmarks.LandmarkFileError` (the one landmark-file error) naming the file and row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..landmarks import LandmarkFileError
from .align import AlignmentError, box_from_keypoints
from .detector import FaceDetection, FaceDetector, NoFaceFound

__all__ = ["SuppliedLandmarks", "LANDMARK_COLUMNS", "BOX_COLUMNS"]

LANDMARK_COLUMNS = ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")


def _finite_points(values, where: str) -> np.ndarray:
    try:
        points = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise LandmarkFileError(f"{where}: keypoints must be numbers, got {values!r}") from None
    if points.shape == (10,):
        points = points.reshape(5, 2)
    if points.shape != (5, 2):
        raise LandmarkFileError(
            f"{where}: need 5 (x, y) keypoints in ArcFace order, got shape {points.shape}"
        )
    if not np.isfinite(points).all():
        raise LandmarkFileError(f"{where}: keypoints contain non-finite values {points.tolist()}")
    return points


def _finite_box(values, where: str) -> tuple[float, float, float, float] | None:
    if values is None:
        return None
    try:
        box = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise LandmarkFileError(f"{where}: box must be 4 numbers, got {values!r}") from None
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise LandmarkFileError(
            f"{where}: box must be 4 finite numbers x0, y0, x1 > x0, y1 > y0, got {values!r}"
        )
    return tuple(float(v) for v in box)  # type: ignore[return-value]


@dataclass
class _SuppliedFace:
    keypoints: np.ndarray
    box: tuple[float, float, float, float] | None
    score: float | None


class SuppliedLandmarks(FaceDetector):
    """Keypoints (and optional boxes) given by the user per image, looked up by the photo's path.

    ``entries`` maps an image key (path, file name or stem) to its faces. Keys match a photo by exact path,
    then file name, then stem. ``normalized=True`` reads coordinates as fractions of the image width/height
    (like ``kprpe align``'s ``landmarks.csv``); otherwise they are photo pixels.
    Build it with :meth:`from_file` (CSV or JSON, formats in docs/face.md).
    """

    name = "supplied"

    def __init__(
        self,
        entries: Mapping[str, Sequence[_SuppliedFace]],
        *,
        normalized: bool = False,
        origin: str = "<memory>",
    ):
        self.normalized = normalized
        self.origin = origin
        self._exact: dict[str, list[_SuppliedFace]] = {}
        self._by_name: dict[str, list[str]] = {}
        self._by_stem: dict[str, list[str]] = {}
        for key, faces in entries.items():
            norm_key = str(Path(key))
            self._exact.setdefault(norm_key, []).extend(faces)
        for key in self._exact:
            self._by_name.setdefault(Path(key).name, []).append(key)
            self._by_stem.setdefault(Path(key).stem, []).append(key)

    def __len__(self) -> int:
        return len(self._exact)

    def describe(self) -> dict:
        return {"backend": "supplied", "file": self.origin, "normalized": self.normalized}

    @classmethod
    def from_arrays(cls, mapping: Mapping[str, np.ndarray], *, normalized: bool = False) -> SuppliedLandmarks:
        """``{image key: (5, 2) or (F, 5, 2) keypoints}`` without boxes."""
        entries = {}
        for key, value in mapping.items():
            array = np.asarray(value, dtype=np.float64)
            faces = array[None] if array.ndim == 2 else array
            entries[key] = [_SuppliedFace(_finite_points(f, f"{key}"), None, None) for f in faces]
        return cls(entries, normalized=normalized)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, normalized: bool = False) -> SuppliedLandmarks:
        path = Path(path)
        if not path.is_file():
            raise LandmarkFileError(f"landmark file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            entries = _read_landmark_csv(path)
        elif suffix == ".json":
            entries = _read_landmark_json(path)
        else:
            raise LandmarkFileError(
                f"landmark file {path}: unsupported extension {suffix!r} (use .csv or .json)"
            )
        if not entries:
            raise LandmarkFileError(f"landmark file {path} lists no faces")
        return cls(entries, normalized=normalized, origin=str(path))

    def _lookup(self, source) -> list[_SuppliedFace]:
        if source is None:
            raise LandmarkFileError("supplied landmarks are looked up by file path, but no path was given")
        source_path = Path(source)
        if str(source_path) in self._exact:
            return self._exact[str(source_path)]
        for index, label in ((self._by_name, source_path.name), (self._by_stem, source_path.stem)):
            keys = index.get(label, [])
            if len(keys) == 1:
                return self._exact[keys[0]]
            if len(keys) > 1:
                raise LandmarkFileError(
                    f"{source}: ambiguous in {self.origin}: entries {sorted(keys)} all match {label!r}; use "
                    "full paths"
                )
        raise NoFaceFound(f"no landmarks supplied for this image in {self.origin}")

    def _to_pixels(self, face: _SuppliedFace, image: np.ndarray) -> FaceDetection:
        height, width = image.shape[:2]
        keypoints = face.keypoints.copy()
        box = face.box
        if self.normalized:
            keypoints = keypoints * np.array([width, height])
            if box is not None:
                box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        if box is None:
            try:
                box = box_from_keypoints(keypoints)
            except AlignmentError as exc:
                raise LandmarkFileError(f"supplied keypoints cannot define a face: {exc}") from None
        return FaceDetection(box=box, keypoints=keypoints, score=face.score, landmarks=keypoints.copy())

    def detect(self, image: np.ndarray, *, source=None) -> list[FaceDetection]:
        return [self._to_pixels(face, image) for face in self._lookup(source)]

    def landmarks_in_box(self, image: np.ndarray, box: Sequence[float], *, source=None) -> FaceDetection:
        faces = self.detect(image, source=source)
        return faces[0]


def _optional_float(text: str | None, where: str) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise LandmarkFileError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LandmarkFileError(f"{where}: {text!r} is not finite")
    return value


def _read_landmark_csv(path: Path) -> dict[str, list[_SuppliedFace]]:
    entries: dict[str, list[_SuppliedFace]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in ("file", *LANDMARK_COLUMNS) if c not in columns]
            if missing:
                raise LandmarkFileError(
                    f"landmark file {path}: missing columns {missing}; need "
                    f"file,{','.join(LANDMARK_COLUMNS)} "
                    f"(optional {','.join(BOX_COLUMNS)},score)"
                )
            extra = [
                c for c in columns if re.fullmatch(r"[xy]\d+", c or "") and c not in LANDMARK_COLUMNS
            ]
            if extra:  # e.g. a 68-point file: silently reading its first 5 points would be wrong points
                raise LandmarkFileError(
                    f"landmark file {path} has {(len(LANDMARK_COLUMNS) + len(extra)) // 2} points "
                    f"(columns up to {extra[-1]}); kprpe needs the 5 ArcFace points "
                    f"({','.join(LANDMARK_COLUMNS)}: left eye, right eye, nose, left and right mouth "
                    "corners). "
                    "From 68 points: eye centres = mean of 36-41 and 42-47, nose 30, mouth corners 48 and 54"
                )
            has_box = all(c in columns for c in BOX_COLUMNS)
            for line_number, row in enumerate(reader, start=2):
                where = f"{path}:{line_number}"
                name = (row.get("file") or "").strip()
                if not name:
                    raise LandmarkFileError(f"{where}: empty 'file' value")
                values = [_optional_float(row.get(c), f"{where} column {c}") for c in LANDMARK_COLUMNS]
                if any(v is None for v in values):
                    raise LandmarkFileError(
                        f"{where}: every keypoint column {LANDMARK_COLUMNS} needs a value"
                    )
                box = None
                if has_box:
                    box_values = [_optional_float(row.get(c), f"{where} column {c}") for c in BOX_COLUMNS]
                    if all(v is not None for v in box_values):
                        box = _finite_box(box_values, where)
                    elif any(v is not None for v in box_values):
                        raise LandmarkFileError(f"{where}: give all four box columns or none")
                score = _optional_float(row.get("score"), f"{where} column score")
                entries.setdefault(name, []).append(_SuppliedFace(_finite_points(values, where), box, score))
    except UnicodeDecodeError:
        raise LandmarkFileError(f"landmark file {path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise LandmarkFileError(f"landmark file {path}: malformed CSV ({exc})") from None
    return entries


def _face_from_json(value, where: str) -> _SuppliedFace:
    if isinstance(value, Mapping):
        if "keypoints" not in value:
            raise LandmarkFileError(f"{where}: face object needs a 'keypoints' entry, has {sorted(value)}")
        score = value.get("score")
        if score is not None and not isinstance(score, (int, float)):
            raise LandmarkFileError(f"{where}: score must be a number, got {score!r}")
        return _SuppliedFace(
            _finite_points(value["keypoints"], where), _finite_box(value.get("box"), where), score
        )
    return _SuppliedFace(_finite_points(value, where), None, None)


def _read_landmark_json(path: Path) -> dict[str, list[_SuppliedFace]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LandmarkFileError(f"landmark file {path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise LandmarkFileError(f"landmark file {path} nests JSON too deeply to be a landmark file") from None
    entries: dict[str, list[_SuppliedFace]] = {}
    if isinstance(data, list):  # [{"file": ..., "keypoints": ..., "box": ...}, ...]
        for index, item in enumerate(data):
            where = f"{path}[{index}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("file"), str):
                raise LandmarkFileError(f"{where}: each entry needs a string 'file' and 'keypoints'")
            entries.setdefault(item["file"], []).append(_face_from_json(item, where))
        return entries
    if not isinstance(data, Mapping):
        raise LandmarkFileError(
            f"landmark file {path}: top level must be an object or a list, got {type(data).__name__}"
        )
    for name, value in data.items():
        where = f"{path} entry {name!r}"
        # several faces: a list of face objects, or a list of 5-point lists
        is_face_list = (
            isinstance(value, list)
            and value
            and (
                isinstance(value[0], Mapping)
                or (isinstance(value[0], list) and value[0] and isinstance(value[0][0], list))
            )
        )
        faces = value if is_face_list else [value]
        entries[name] = [_face_from_json(face, f"{where} face {i}") for i, face in enumerate(faces)]
    return entries
