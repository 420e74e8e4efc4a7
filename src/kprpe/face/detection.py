"""Face detection and 5-point landmarks behind one small interface.

A :class:`FaceDetector` turns an RGB photo into :class:`FaceDetection` objects: a box and the 5 ArcFace
keypoints (image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner) in
photo pixels. Backends:

* :class:`DlibDetector` — offline, from the ``kprpe[face]`` extra (``dlib-bin`` + ``face-recognition-models``):
  HOG or CNN (MMOD) detector, 68-point (default) or 5-point shape model, converted to the ArcFace order.
* :class:`SuppliedLandmarks` — landmarks (and optionally boxes) read from a CSV or JSON file per image, so any
  external detector (RetinaFace, SCRFD, MTCNN, ...) can feed the pipeline.

dlib is imported lazily so ``import kprpe`` works without it.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import KprpeError
from ..keypoints import ARCFACE_TEMPLATE_112
from ..landmarks import LandmarkFileError
from .align import AlignmentError, box_from_keypoints

__all__ = [
    "FaceDetection",
    "FaceDetector",
    "DlibDetector",
    "SuppliedLandmarks",
    "LandmarkFileError",
    "MissingDependencyError",
    "NoFaceFound",
    "face_models_dir",
    "arcface_points_from_68",
    "arcface_points_from_dlib5",
    "LANDMARK_COLUMNS",
]

LANDMARK_COLUMNS = ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
_EXTRA_HINT = "install the optional extra: pip install 'kprpe[face]' (dlib-bin and face-recognition-models)"


class MissingDependencyError(KprpeError, ImportError):
    """An optional dependency of the face pipeline is not installed."""


class NoFaceFound(KprpeError, ValueError):
    """The detector found no face in an image (or no landmarks were supplied for it)."""


@dataclass
class FaceDetection:
    """One face in a photo: ``box`` ``(x0, y0, x1, y1)`` and ``keypoints`` ``(5, 2)`` in photo pixels.

    ``landmarks`` keeps the backend's raw points (68 or 5 for dlib) for drawing and debugging.
    """

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float | None = None
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class FaceDetector(ABC):
    """Finds faces and their 5 ArcFace keypoints in ``(H, W, 3)`` uint8 RGB photos."""

    name = "detector"

    @abstractmethod
    def detect(self, image: np.ndarray, *, source: str | os.PathLike | None = None) -> list[FaceDetection]:
        """All faces found (any order); ``source`` is the photo's path for backends that look it up."""

    @abstractmethod
    def landmarks_in_box(
        self, image: np.ndarray, box: Sequence[float], *, source: str | os.PathLike | None = None
    ) -> FaceDetection:
        """Keypoints of the face known to lie in ``box`` (used for pre-aligned crops)."""

    def describe(self) -> dict:
        """A JSON-able description stored with outputs (so results say how they were made)."""
        return {"backend": self.name}


# ---------------------------------------------------------------------------------------------- dlib backend


def face_models_dir() -> Path:
    """The ``models/`` folder of the ``face-recognition-models`` package, found without importing it.

    (Its ``__init__`` imports ``pkg_resources``, which recent setuptools no longer ship.)
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the dlib face backend needs the face-recognition-models package; {_EXTRA_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models"
        if candidate.is_dir():
            return candidate
    raise MissingDependencyError(f"face-recognition-models is installed but has no models/ folder; {_EXTRA_HINT}")


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise MissingDependencyError(f"the dlib face backend needs dlib ({exc}); {_EXTRA_HINT}") from None
    return dlib


@functools.lru_cache(maxsize=8)
def _load_dlib_model(kind: str, path: str):
    """Load (once per process) a dlib model file; the 68-point model alone takes most of a second."""
    dlib = _import_dlib()
    if not Path(path).is_file():
        raise MissingDependencyError(f"dlib model file not found: {path}; {_EXTRA_HINT}")
    if kind == "shape":
        return dlib.shape_predictor(path)
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(path)
    raise ValueError(f"unknown dlib model kind {kind!r}")


@functools.lru_cache(maxsize=1)
def _hog_detector():
    return _import_dlib().get_frontal_face_detector()


def arcface_points_from_68(points: np.ndarray) -> np.ndarray:
    """68-point iBUG layout (0-based) -> ArcFace 5: eye centres (36-41, 42-47), nose tip 30, mouth 48, 54."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks of shape (68, 2), got {points.shape}")
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


# dlib's 5-point model marks the two corners of each eye and the base of the nose (subnasale), not the
# mouth. Its ArcFace points are estimated: an affine map fitted to eye centres + subnasale carries the template
# nose tip and mouth corners over. Reference subnasale measured on an aligned face with the 68-point model.
_DLIB5_REFERENCE = np.array(
    [ARCFACE_TEMPLATE_112[0], ARCFACE_TEMPLATE_112[1], [56.0, 82.0]], dtype=np.float64
)


def arcface_points_from_dlib5(points: np.ndarray) -> np.ndarray:
    """dlib 5-point layout (0-1 image-right eye corners, 2-3 image-left eye corners, 4 subnasale) -> ArcFace 5.

    The eyes are measured; nose tip and mouth corners are estimates (see module notes), so prefer the 68-point
    model or supplied landmarks when keypoint accuracy matters.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 dlib landmarks of shape (5, 2), got {points.shape}")
    left_eye, right_eye, subnasale = points[2:4].mean(0), points[0:2].mean(0), points[4]
    measured = np.stack([left_eye, right_eye, subnasale]).astype(np.float32)
    affine = cv2.getAffineTransform(_DLIB5_REFERENCE.astype(np.float32), measured).astype(np.float64)
    estimated = ARCFACE_TEMPLATE_112[2:] @ affine[:, :2].T + affine[:, 2]
    return np.vstack([left_eye, right_eye, estimated])


class DlibDetector(FaceDetector):
    """dlib HOG (default) or CNN face detector + 68- or 5-point shape model, offline.

    ``upsample``: how many times dlib doubles the image before detecting (finds faces down to ~40 px at 1,
    ~20 px at 2); ``"auto"`` tries 0, then 1, then 2 until a face is found, which keeps the common case fast
    and avoids the false positives of always upsampling. ``min_score``: HOG score / CNN confidence threshold.
    """

    name = "dlib"

    def __init__(
        self,
        detector: str = "hog",
        landmark_model: str = "68",
        *,
        upsample: int | str = "auto",
        min_score: float = 0.0,
        models_dir: str | os.PathLike | None = None,
        max_upsampled_side: int = 2400,
    ) -> None:
        if detector not in ("hog", "cnn"):
            raise ValueError(f"dlib detector must be 'hog' or 'cnn', got {detector!r}")
        landmark_model = str(landmark_model)
        if landmark_model not in ("68", "5"):
            raise ValueError(f"dlib landmark model must be '68' or '5', got {landmark_model!r}")
        if upsample != "auto" and not (isinstance(upsample, int) and 0 <= upsample <= 4):
            raise ValueError(f"upsample must be 'auto' or an int in 0..4, got {upsample!r}")
        _import_dlib()
        self.detector_kind = detector
        self.landmark_model = landmark_model
        self.upsample = upsample
        self.min_score = float(min_score)
        self.max_upsampled_side = int(max_upsampled_side)
        directory = Path(models_dir) if models_dir is not None else face_models_dir()
        shape_file = "shape_predictor_68_face_landmarks.dat" if landmark_model == "68" else "shape_predictor_5_face_landmarks.dat"
        self._shape_path = str(directory / shape_file)
        self._predictor = _load_dlib_model("shape", self._shape_path)
        self._cnn = _load_dlib_model("cnn", str(directory / "mmod_human_face_detector.dat")) if detector == "cnn" else None

    def describe(self) -> dict:
        return {
            "backend": "dlib",
            "detector": self.detector_kind,
            "landmark_model": self.landmark_model,
            "upsample": self.upsample,
            "min_score": self.min_score,
        }

    def _upsample_levels(self, image: np.ndarray) -> list[int]:
        if self.upsample != "auto":
            return [int(self.upsample)]
        side = max(image.shape[:2])
        return [level for level in (0, 1, 2) if level == 0 or side * 2**level <= self.max_upsampled_side]

    def _boxes(self, image: np.ndarray) -> list[tuple[object, float]]:
        for level in self._upsample_levels(image):
            if self._cnn is not None:
                found = [(d.rect, float(d.confidence)) for d in self._cnn(image, level)]
            else:
                rects, scores, _ = _hog_detector().run(image, level, self.min_score)
                found = list(zip(rects, (float(s) for s in scores), strict=True))
            found = [(rect, score) for rect, score in found if score >= self.min_score]
            if found:
                return found
        return []

    def _shape(self, image: np.ndarray, rect) -> tuple[np.ndarray, np.ndarray]:
        shape = self._predictor(image, rect)
        raw = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        points = arcface_points_from_68(raw) if self.landmark_model == "68" else arcface_points_from_dlib5(raw)
        return points, raw

    @staticmethod
    def _prepare(image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"detector expects a (H, W, 3) uint8 RGB image, got {getattr(image, 'shape', type(image))}")
        return np.ascontiguousarray(image)

    def detect(self, image: np.ndarray, *, source=None) -> list[FaceDetection]:
        image = self._prepare(image)
        faces = []
        for rect, score in self._boxes(image):
            points, raw = self._shape(image, rect)
            # dlib rectangles are inclusive pixel indices; boxes here are continuous pixel-edge coordinates
            box = (rect.left() - 0.5, rect.top() - 0.5, rect.right() + 0.5, rect.bottom() + 0.5)
            faces.append(FaceDetection(box=box, keypoints=points, score=score, landmarks=raw))
        return faces

    def landmarks_in_box(self, image: np.ndarray, box: Sequence[float], *, source=None) -> FaceDetection:
        image = self._prepare(image)
        dlib = _import_dlib()
        x0, y0, x1, y1 = (float(v) for v in box)
        rect = dlib.rectangle(round(x0 + 0.5), round(y0 + 0.5), round(x1 - 0.5), round(y1 - 0.5))
        points, raw = self._shape(image, rect)
        return FaceDetection(box=(x0, y0, x1, y1), keypoints=points, score=None, landmarks=raw)


# ------------------------------------------------------------------------------------ user-supplied landmarks


def _finite_points(values, where: str) -> np.ndarray:
    try:
        points = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise LandmarkFileError(f"{where}: keypoints must be numbers, got {values!r}") from None
    if points.shape == (10,):
        points = points.reshape(5, 2)
    if points.shape != (5, 2):
        raise LandmarkFileError(f"{where}: need 5 (x, y) keypoints in ArcFace order, got shape {points.shape}")
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
        raise LandmarkFileError(f"{where}: box must be 4 finite numbers x0, y0, x1 > x0, y1 > y0, got {values!r}")
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

    def __init__(self, entries: Mapping[str, Sequence[_SuppliedFace]], *, normalized: bool = False, origin: str = "<memory>"):
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
            raise LandmarkFileError(f"landmark file {path}: unsupported extension {suffix!r} (use .csv or .json)")
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
                    f"{source}: ambiguous in {self.origin}: entries {sorted(keys)} all match {label!r}; use full paths"
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
                    f"landmark file {path}: missing columns {missing}; need file,{','.join(LANDMARK_COLUMNS)} "
                    f"(optional {','.join(BOX_COLUMNS)},score)"
                )
            has_box = all(c in columns for c in BOX_COLUMNS)
            for line_number, row in enumerate(reader, start=2):
                where = f"{path}:{line_number}"
                name = (row.get("file") or "").strip()
                if not name:
                    raise LandmarkFileError(f"{where}: empty 'file' value")
                values = [_optional_float(row.get(c), f"{where} column {c}") for c in LANDMARK_COLUMNS]
                if any(v is None for v in values):
                    raise LandmarkFileError(f"{where}: every keypoint column {LANDMARK_COLUMNS} needs a value")
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
        return _SuppliedFace(_finite_points(value["keypoints"], where), _finite_box(value.get("box"), where), score)
    return _SuppliedFace(_finite_points(value, where), None, None)


def _read_landmark_json(path: Path) -> dict[str, list[_SuppliedFace]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LandmarkFileError(f"landmark file {path} is not valid JSON ({exc})") from None
    entries: dict[str, list[_SuppliedFace]] = {}
    if isinstance(data, list):  # [{"file": ..., "keypoints": ..., "box": ...}, ...]
        for index, item in enumerate(data):
            where = f"{path}[{index}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("file"), str):
                raise LandmarkFileError(f"{where}: each entry needs a string 'file' and 'keypoints'")
            entries.setdefault(item["file"], []).append(_face_from_json(item, where))
        return entries
    if not isinstance(data, Mapping):
        raise LandmarkFileError(f"landmark file {path}: top level must be an object or a list, got {type(data).__name__}")
    for name, value in data.items():
        where = f"{path} entry {name!r}"
        # several faces: a list of face objects, or a list of 5-point lists
        is_face_list = isinstance(value, list) and value and (
            isinstance(value[0], Mapping) or (isinstance(value[0], list) and value[0] and isinstance(value[0][0], list))
        )
        faces = value if is_face_list else [value]
        entries[name] = [_face_from_json(face, f"{where} face {i}") for i, face in enumerate(faces)]
    return entries
