"""Where evaluation keypoints come from: landmark files, the optional face backend, or the template.

The file formats (normalised ``idx,ldmk_0..ldmk_9`` CSV, IJB pixel lists) are read by :mod:`kprpe.landmarks`,
their one home; this module re-exports those readers under the names evaluation code uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..keypoints import template_keypoints
from ..landmarks import LandmarkFileError, read_pixel_landmarks
from ..landmarks import read_landmark_rows as read_normalized_landmark_csv

__all__ = [
    "LandmarkFileError",
    "read_normalized_landmark_csv",
    "read_pixel_landmarks",
    "template_keypoints_for",
    "face_backend_landmarks",
    "face_backend_available",
    "LandmarkBackend",
    "DEFAULT_LANDMARK_BACKEND",
    "backend_tag",
    "indexed_keypoints",
    "set_landmark_backend",
]


def template_keypoints_for(n: int) -> np.ndarray:
    """The ArcFace template for ``n`` images: the right keypoints when the images really are aligned to it."""
    return template_keypoints(n).numpy().astype(np.float64)


def indexed_keypoints(kind: str, landmarks, count: int, *, what: str = "images", index_name: str = "idx",
                      error: type[Exception] = ValueError, backend: LandmarkBackend | None = None):
    """Keypoints of a pre-aligned set's faces ``0..count-1``, a batch at a time: ``keypoints(start, stop,
    images)`` -> ``(stop - start, 5, 2)``. ``kind``: ``file`` (a normalised ``idx,ldmk_0..ldmk_9`` CSV keyed
    by the face's index; every face must have a row, else ``error`` names the first missing one), ``backend``
    (``backend``'s landmarks of the batch's images; default dlib) or ``template``. One definition for every
    set kind (``.bin`` files, toolkit sets)."""
    table = None
    if kind == "file":
        table = read_normalized_landmark_csv(landmarks)
        missing = [i for i in range(count) if i not in table]
        if missing:
            raise error(
                f"{landmarks}: no landmarks for {len(missing)} of {count} {what} (first: {index_name} "
                f"{missing[0]})"
            )

    def keypoints(start: int, stop: int, images: np.ndarray) -> np.ndarray:
        if kind == "file":
            return np.stack([table[i] for i in range(start, stop)])
        if kind == "backend":
            return face_backend_landmarks(images, backend)
        return template_keypoints_for(stop - start)

    return keypoints


@dataclass(frozen=True)
class LandmarkBackend:
    """Where ``backend`` keypoints come from: ``dlib`` (default; 68-point landmarks in the template face box)
    or ``dfa`` (the official DFA aligner, ``weights`` a path or repo id, on ``device``).

    One object per run, passed to whatever finds keypoints (``EvalSettings.landmark_backend``, the
    ``backend=`` arguments): the choice was a module global once, so a run inherited the aligner of the run
    before it in the same process, and a second thread could swap it between a set's cache key and its
    keypoints. The backend is loaded on first use and kept with the object, under a lock."""

    aligner: str = "dlib"
    weights: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    _loaded: list = field(default_factory=list, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.aligner not in ("dlib", "dfa"):
            raise ValueError(f"landmark backend must be 'dlib' or 'dfa', got {self.aligner!r}")

    @property
    def tag(self) -> str:
        """What the embedding cache must know about the backend: empty for dlib (the keys made before the
        DFA existed stay valid), the aligner and its weights otherwise."""
        return "" if self.aligner == "dlib" else f"|aligner:{self.aligner}:{self.weights}"

    def available(self) -> bool:
        """Whether this backend can run: the DFA needs only torch; dlib its packages."""
        if importlib.util.find_spec("kprpe.face") is None:
            return False
        if self.aligner == "dfa":
            return True
        return all(importlib.util.find_spec(name) is not None for name in ("dlib", "face_recognition_models"))

    def load(self):
        """The loaded backend (built once per object; the DFA raises AlignerLoadError naming the weights)."""
        with self._lock:
            if not self._loaded:
                face = importlib.import_module("kprpe.face")
                if self.aligner == "dfa":
                    backend = importlib.import_module("kprpe.face.dfa_backend")
                    pipeline = backend.load_dfa_backend(self.weights, device=self.device,
                                                        batch_size=self.batch_size)
                else:
                    pipeline = face.FacePipeline(mode="prealigned")
                self._loaded.append(pipeline)
            return self._loaded[0]

    def landmarks(self, images: np.ndarray) -> np.ndarray:
        """Keypoints of pre-aligned uint8 RGB 112x112 faces ``(B, 112, 112, 3)`` as normalised
        ``(B, 5, 2)``.

        dlib: the ``prealigned`` pipeline (landmarks searched in the template face box), one image at a
        time. DFA: the whole batch in one forward pass; the keypoints are the official ``orig_pred_ldmks``
        (the landmarks in the input frame, what the official evaluation gives KP-RPE for pre-aligned sets).
        Imported lazily, so evaluation works without the face package or dlib.
        """
        if importlib.util.find_spec("kprpe.face") is None:
            raise RuntimeError("the landmark backend needs the kprpe.face package, which is not installed; "
                               "use --landmarks FILE or --keypoints template")
        try:
            backend = self.load()
        except ImportError as exc:
            raise RuntimeError(f"landmark backend unavailable: {exc}") from None
        out = np.empty((images.shape[0], 5, 2), dtype=np.float64)
        if self.aligner == "dfa":
            height, width = images.shape[1:3]
            for i, result in enumerate(backend.align([np.ascontiguousarray(image) for image in images])):
                frame = result.frame_keypoints
                out[i] = frame if frame is not None else result.keypoints / np.array([width, height])
            return out
        for i, image in enumerate(images):
            try:
                faces = backend.faces_in_image(np.ascontiguousarray(image))
            except ImportError as exc:  # the optional dlib backend is missing
                raise RuntimeError(f"landmark backend unavailable: {exc}") from None
            except Exception as exc:
                raise RuntimeError(f"landmark backend failed on image {i} of the batch: {exc}") from None
            out[i] = np.asarray(faces[0].keypoints, dtype=np.float64)
        return out


# the backend of every call given none: dlib, which takes no settings, so sharing it (and the dlib
# pipeline it loads once) carries nothing from one run to another
DEFAULT_LANDMARK_BACKEND = LandmarkBackend()


_DEPRECATED_CHOICE: list[LandmarkBackend] = []  # set only by set_landmark_backend (deprecated, goes in 0.5)


def _or_default(backend: LandmarkBackend | None) -> LandmarkBackend:
    if backend is not None:
        return backend
    return _DEPRECATED_CHOICE[0] if _DEPRECATED_CHOICE else DEFAULT_LANDMARK_BACKEND


def set_landmark_backend(
    aligner: str = "dlib", *, weights: str | None = None, device: str = "cpu", batch_size: int = 64
) -> None:
    """Deprecated (goes in 0.5): pass ``LandmarkBackend(...)`` as ``EvalSettings.landmark_backend`` or as
    ``backend=``. Until then it sets the backend of every call given none, process-wide, as it did."""
    warnings.warn(
        "kprpe.eval.landmarks.set_landmark_backend is deprecated and goes in kprpe 0.5: pass "
        "LandmarkBackend(aligner, weights, device, batch_size) as "
        "EvalSettings.landmark_backend or backend= (a process-wide choice leaked into later runs)",
        FutureWarning,
        stacklevel=2,
    )
    _DEPRECATED_CHOICE[:] = [LandmarkBackend(aligner, weights, device, batch_size)]


def backend_tag(backend: LandmarkBackend | None = None) -> str:
    """``backend.tag`` (the default dlib backend: empty)."""
    return _or_default(backend).tag


def face_backend_available(backend: LandmarkBackend | None = None) -> bool:
    """``backend.available()`` (the default: dlib)."""
    return _or_default(backend).available()


def face_backend_landmarks(images: np.ndarray, backend: LandmarkBackend | None = None) -> np.ndarray:
    """``backend.landmarks(images)`` (the default: dlib); see :meth:`LandmarkBackend.landmarks`."""
    return _or_default(backend).landmarks(images)
