"""Photo -> faces -> model-ready crops -> embeddings -> similarity: the face pipeline as plain Python.

>>> from kprpe.face import FacePipeline, FaceEmbedder
>>> pipeline = FacePipeline()                               # dlib HOG + 68 points, ArcFace alignment
>>> embedder = FaceEmbedder.from_weights("model.safetensors")  # anything kprpe.load_official accepts
>>> faces = pipeline.faces_in_file("photo.jpg")             # largest face first
>>> unit, norms = embedder.embed_faces(faces)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..images import ImageLoadError, expand_image_paths, load_image
from ..inference import embed, to_model_input
from .align import (
    ALIGN_MODES,
    CROP_SIZE,
    TEMPLATE_FACE_BOX,
    AlignedFace,
    AlignmentError,
    align_face,
)
from .detection import FaceDetector, LandmarkFileError, NoFaceFound

__all__ = [
    "DEFAULT_THRESHOLD",
    "FacePipeline",
    "FaceEmbedder",
    "FaceRecord",
    "BatchResult",
    "VerifyResult",
    "cosine_similarity",
    "verify",
    "model_fingerprint",
]

# Cosine-similarity threshold for "same person". Typical for ArcFace-style models, but it depends on the
# checkpoint and the false-accept rate you need: calibrate it on your own pairs.
DEFAULT_THRESHOLD = 0.3


@dataclass
class FaceRecord:
    """One face of one photo: ``name`` (the path, ``#i`` appended for extra faces with ``all_faces``)."""

    name: str
    source: str
    face_index: int
    face: AlignedFace


@dataclass
class BatchResult:
    """Faces found in a batch of photos, and the photos that failed (``(path, reason)``) — never silently."""

    records: list[FaceRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


class FacePipeline:
    """Detection + landmarks + cropping, with the conventions of SPEC §3.

    ``detector``: any :class:`~kprpe.face.detection.FaceDetector` (default: dlib HOG + 68 points, created on
    first use). ``mode``: ``aligned`` | ``unaligned`` | ``prealigned`` (see :func:`~kprpe.face.align.align_face`).
    ``all_faces``: keep every face (largest first) instead of only the largest. ``min_face_size``: ignore
    faces whose box side is smaller (pixels); tiny faces still work but give blurry crops.
    ``min_relative_score``: ignore detections scoring below this fraction of the best detection's score
    (0 disables). "Largest face" is only meaningful among real faces: a weak false positive (the HOG detector
    scores the astronaut photo's shoulder badge 0.07 against 1.63 for her face) can have the bigger box.
    """

    def __init__(
        self,
        detector: FaceDetector | None = None,
        *,
        mode: str = "aligned",
        all_faces: bool = False,
        min_face_size: float = 0.0,
        min_relative_score: float = 0.25,
    ) -> None:
        if mode not in ALIGN_MODES:
            raise ValueError(f"unknown alignment mode {mode!r}; choose one of {ALIGN_MODES}")
        if min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0, got {min_face_size}")
        if not 0 <= min_relative_score <= 1:
            raise ValueError(f"min_relative_score must be in [0, 1], got {min_relative_score}")
        self.min_relative_score = float(min_relative_score)
        self._detector = detector
        self.mode = mode
        self.all_faces = all_faces
        self.min_face_size = float(min_face_size)

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            from .detection import DlibDetector

            self._detector = DlibDetector()
        return self._detector

    def describe(self) -> dict:
        return {"mode": self.mode, "all_faces": self.all_faces, "min_face_size": self.min_face_size,
                "min_relative_score": self.min_relative_score, "detector": self.detector.describe()}

    def faces_in_image(self, image: np.ndarray, *, source: str | os.PathLike | None = None) -> list[AlignedFace]:
        """Crops of the faces in an RGB uint8 photo, largest first (only the largest unless ``all_faces``).

        Raises :class:`NoFaceFound` when there is none, :class:`AlignmentError` for bad keypoints.
        """
        if self.mode == "prealigned":
            if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
                raise AlignmentError(
                    f"mode 'prealigned' needs {CROP_SIZE}x{CROP_SIZE} crops, got {image.shape[1]}x{image.shape[0]}; "
                    "use mode 'aligned' or 'unaligned' for photos"
                )
            found = self.detector.landmarks_in_box(image, TEMPLATE_FACE_BOX, source=source)
            return [align_face(image, found.keypoints, mode="prealigned", box=found.box, score=found.score)]
        detections = self.detector.detect(image, source=source)
        if not detections:
            raise NoFaceFound(f"no face found ({_describe_short(self.detector)})")
        sizes = [min(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in detections]
        kept = [d for d, size in zip(detections, sizes, strict=True) if size >= self.min_face_size]
        if not kept:
            raise NoFaceFound(
                f"only faces smaller than min_face_size={self.min_face_size:g} px found (largest {max(sizes):.0f} px)"
            )
        scores = [d.score for d in kept]
        if self.min_relative_score > 0 and all(sc is not None for sc in scores) and max(scores) > 0:
            floor = self.min_relative_score * max(scores)
            kept = [d for d in kept if d.score >= floor]
        kept.sort(key=lambda d: d.area, reverse=True)
        if not self.all_faces:
            kept = kept[:1]
        faces = []
        for detection in kept:
            face = align_face(image, detection.keypoints, mode=self.mode, box=detection.box, score=detection.score)
            face.extra["landmarks"] = detection.landmarks
            face.extra["face_size"] = float(min(detection.box[2] - detection.box[0], detection.box[3] - detection.box[1]))
            faces.append(face)
        return faces

    def faces_in_file(self, path: str | os.PathLike) -> list[AlignedFace]:
        """Load a photo (any mode, EXIF-upright) and crop its faces; errors name the file."""
        image = load_image(path)
        try:
            return self.faces_in_image(image, source=path)
        except (NoFaceFound, AlignmentError, LandmarkFileError) as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def process(self, inputs: Iterable[str | os.PathLike], *, progress: bool = True) -> BatchResult:
        """Files and directories -> every face found, plus a failure entry for each photo that gave none.

        A failing photo (unreadable, not an image, no face) is reported and the rest continue.
        """
        result = BatchResult()
        paths = expand_image_paths(inputs)
        for path in tqdm(paths, desc="faces", unit="img", disable=None if progress else True):
            try:
                image = load_image(path)
                faces = self.faces_in_image(image, source=path)
            except (ImageLoadError, NoFaceFound, AlignmentError, LandmarkFileError) as exc:
                reason = exc.reason if isinstance(exc, ImageLoadError) else str(exc)
                result.failures.append((str(path), reason))
                continue
            for index, face in enumerate(faces):
                name = str(path) if index == 0 and not self.all_faces else f"{path}#{index}"
                result.records.append(FaceRecord(name=name, source=str(path), face_index=index, face=face))
        return result


def _describe_short(detector: FaceDetector) -> str:
    info = detector.describe()
    return ", ".join(f"{k}={v}" for k, v in info.items())


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, bytes): ties an index to the weights that made it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FaceEmbedder:
    """KP-RPE (or any kprpe) model + flip test-time augmentation over crops from :class:`FacePipeline`.

    Flip TTA sums the raw embeddings of a crop and its mirror (keypoints mirrored, 0<->1 and 3<->4 swapped)
    before L2-normalising; the norm of the summed embedding is returned alongside (a quality signal).
    """

    def __init__(self, model: torch.nn.Module, *, flip: bool = True, batch_size: int = 64, device: str | None = None) -> None:
        config = getattr(model, "config", None)
        if config is not None:
            if getattr(config, "img_size", CROP_SIZE) != CROP_SIZE:
                raise ValueError(f"the face pipeline makes {CROP_SIZE}x{CROP_SIZE} crops but the model expects {config.img_size}")
            if getattr(config, "rel_pos", "") == "kprpe" and getattr(config, "num_keypoints", 5) != 5:
                raise ValueError(f"the face pipeline gives 5 keypoints but the model expects {config.num_keypoints}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.flip = flip
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @classmethod
    def from_weights(cls, weights: str | os.PathLike, **kwargs) -> FaceEmbedder:
        """Load any checkpoint :func:`kprpe.load_official` accepts (file, published directory)."""
        from ..nn import load_official

        return cls(load_official(weights), **kwargs)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def output_dim(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "output_dim", 0))

    def embed_crops(self, crops: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops ``(N, 112, 112, 3)`` + normalised keypoints ``(N, 5, 2)`` -> unit ``(N, D)``, norms ``(N,)``."""
        crops = np.asarray(crops)
        keypoints = np.asarray(keypoints, dtype=np.float32)
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(f"crops must be uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3), got {crops.dtype} {crops.shape}")
        if keypoints.shape != (crops.shape[0], 5, 2):
            raise ValueError(f"keypoints must have shape ({crops.shape[0]}, 5, 2), got {keypoints.shape}")
        if crops.shape[0] == 0:
            return np.zeros((0, self.output_dim), np.float32), np.zeros((0,), np.float32)
        unit, norms = embed(
            self.model,
            to_model_input(crops),
            torch.from_numpy(keypoints),
            flip=self.flip,
            batch_size=self.batch_size,
            device=self.device,
        )
        return unit.numpy().astype(np.float32), norms.numpy().astype(np.float32)

    def embed_faces(self, faces: Sequence[AlignedFace]) -> tuple[np.ndarray, np.ndarray]:
        """Embed crops made by :class:`FacePipeline` (batched)."""
        if not faces:
            return self.embed_crops(np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8), np.zeros((0, 5, 2), np.float32))
        crops = np.stack([face.image for face in faces])
        keypoints = np.stack([face.keypoints for face in faces]).astype(np.float32)
        return self.embed_crops(crops, keypoints)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit embeddings, ``(N, D) x (M, D) -> (N, M)`` (also works for single vectors)."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T


@dataclass
class VerifyResult:
    """Outcome of comparing the (largest) faces of two photos."""

    similarity: float
    same: bool
    threshold: float
    faces: tuple[AlignedFace, AlignedFace]
    norms: tuple[float, float]

    def to_dict(self) -> dict:
        return {
            "similarity": self.similarity,
            "same": self.same,
            "threshold": self.threshold,
            "norms": list(self.norms),
            "keypoints": [face.keypoints.round(6).tolist() for face in self.faces],
            "boxes": [list(face.box) if face.box is not None else None for face in self.faces],
        }


def verify(
    photo_a: str | os.PathLike | np.ndarray,
    photo_b: str | os.PathLike | np.ndarray,
    *,
    pipeline: FacePipeline,
    embedder: FaceEmbedder,
    threshold: float = DEFAULT_THRESHOLD,
) -> VerifyResult:
    """Are the largest faces of two photos (paths or RGB uint8 arrays) the same person?"""
    faces = []
    for photo in (photo_a, photo_b):
        if isinstance(photo, np.ndarray):
            faces.append(pipeline.faces_in_image(photo)[0])
        else:
            faces.append(pipeline.faces_in_file(Path(photo))[0])
    unit, norms = embedder.embed_faces(faces)
    similarity = float(np.clip(unit[0].astype(np.float64) @ unit[1].astype(np.float64), -1.0, 1.0))
    return VerifyResult(
        similarity=similarity,
        same=bool(similarity >= threshold),
        threshold=float(threshold),
        faces=(faces[0], faces[1]),
        norms=(float(norms[0]), float(norms[1])),
    )
