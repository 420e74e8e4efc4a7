"""The offline face backend: dlib's HOG or CNN (MMOD) detector and its 68- or 5-point shape model, converted
to the ArcFace 5 points. From the ``kprpe[face]`` extra (``dlib-bin`` + ``face-recognition-models``); dlib is
imported on first use, so ``import kprpe.face`` works without it."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..keypoints import ARCFACE_TEMPLATE_112
from .detector import EXTRA_HINT as _EXTRA_HINT
from .detector import FaceDetection, FaceDetector, MissingDependencyError

__all__ = ["DlibDetector", "face_models_dir", "arcface_points_from_68", "arcface_points_from_dlib5"]


def face_models_dir() -> Path:
    """The ``models/`` folder of the ``face-recognition-models`` package, found without importing it.

    (Its ``__init__`` imports ``pkg_resources``, which recent setuptools no longer ship.)
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the dlib face backend needs the face-recognition-models package; {_EXTRA_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models"
        if candidate.is_dir():
            return candidate
    raise MissingDependencyError(
        f"face-recognition-models is installed but has no models/ folder; {_EXTRA_HINT}"
    )


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
# mouth. Its ArcFace points are estimated: an affine map fitted to eye centres + subnasale carries the
# template
# nose tip and mouth corners over. Reference subnasale measured on an aligned face with the 68-point model.
_DLIB5_REFERENCE = np.array(
    [ARCFACE_TEMPLATE_112[0], ARCFACE_TEMPLATE_112[1], [56.0, 82.0]], dtype=np.float64
)


def arcface_points_from_dlib5(points: np.ndarray) -> np.ndarray:
    """dlib 5-point layout (0-1 image-right eye corners, 2-3 image-left eye corners, 4 subnasale) -> ArcFace
    5.

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


def _scaled_rect(rect, factor: float):
    """A dlib rectangle found on a resized image, in the original image's pixel indices."""
    dlib = _import_dlib()
    return dlib.rectangle(
        round((rect.left() + 0.5) * factor - 0.5),
        round((rect.top() + 0.5) * factor - 0.5),
        round((rect.right() + 0.5) * factor - 0.5),
        round((rect.bottom() + 0.5) * factor - 0.5),
    )


class DlibDetector(FaceDetector):
    """dlib HOG (default) or CNN face detector + 68- or 5-point shape model, offline.

    ``upsample``: how many times dlib doubles the image before detecting (finds faces down to ~40 px at 1,
    ~20 px at 2); ``"auto"`` tries 0, then 1, then 2 until a face is found, which keeps the common case fast
    and avoids the false positives of always upsampling. ``min_score``: HOG score / CNN confidence threshold.
    ``max_detect_side``: photos larger than this are searched for faces at this size (the landmarks are still
    placed on the full-resolution photo), so an 8000-pixel photo costs what a 2000-pixel one does.
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
        max_detect_side: int = 2000,
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
        if int(max_detect_side) < 64:
            raise ValueError(f"max_detect_side must be at least 64 pixels, got {max_detect_side}")
        self.max_detect_side = int(max_detect_side)
        directory = Path(models_dir) if models_dir is not None else face_models_dir()
        shape_file = (
            "shape_predictor_68_face_landmarks.dat"
            if landmark_model == "68"
            else "shape_predictor_5_face_landmarks.dat"
        )
        self._shape_path = str(directory / shape_file)
        self._predictor = _load_dlib_model("shape", self._shape_path)
        self._cnn = (
            _load_dlib_model("cnn", str(directory / "mmod_human_face_detector.dat"))
            if detector == "cnn"
            else None
        )

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
        points = (
            arcface_points_from_68(raw) if self.landmark_model == "68" else arcface_points_from_dlib5(raw)
        )
        return points, raw

    @staticmethod
    def _prepare(image: np.ndarray) -> np.ndarray:
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            raise ValueError(
                f"detector expects a (H, W, 3) uint8 RGB image, got {getattr(image, 'shape', type(image))}"
            )
        return np.ascontiguousarray(image)

    def detect(self, image: np.ndarray, *, source=None) -> list[FaceDetection]:
        image = self._prepare(image)
        # Large photos are searched at a reduced size (area-averaged): detection cost and memory stay bounded
        # whatever the camera; the landmarks are then placed on the full-resolution photo.
        side = max(image.shape[:2])
        scale = min(1.0, self.max_detect_side / side)
        searched = image
        if scale < 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            searched = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        faces = []
        for small_rect, score in self._boxes(searched):
            rect = small_rect if scale == 1.0 else _scaled_rect(small_rect, 1.0 / scale)
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
