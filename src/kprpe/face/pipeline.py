"""Photo -> faces -> model-ready crops -> embeddings -> similarity: the face pipeline as plain Python.

>>> from kprpe.face import FacePipeline, FaceEmbedder
>>> pipeline = FacePipeline()                               # dlib HOG + 68 points, ArcFace alignment
>>> embedder = FaceEmbedder.from_weights("model.safetensors")  # anything kprpe.load_official accepts
>>> faces = pipeline.faces_in_file("photo.jpg")             # largest face first
>>> unit, norms = embedder.embed_faces(faces)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..images import ImageLoadError, expand_image_paths, load_image
from ..landmarks import LandmarkFileError
from ..thresholds import DEFAULT_THRESHOLD
from .align import (
    ALIGN_MODES,
    CROP_SIZE,
    TEMPLATE_FACE_BOX,
    AlignedFace,
    AlignmentError,
    align_face,
    backend_aligned_face,
)
from .detector import FaceDetector, NoFaceFound
from .embedder import FaceEmbedder, model_fingerprint

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
    """Detection + landmarks + cropping, with the conventions of docs/face.md ("Conventions").

    ``detector``: any :class:`~kprpe.face.detector.FaceDetector` (default: dlib HOG + 68 points, created on
    first use). ``mode``: ``aligned`` | ``unaligned`` | ``prealigned`` (see
    :func:`~kprpe.face.align.align_face`).
    ``all_faces``: keep every face (largest first) instead of only the largest. ``min_face_size``: ignore
    faces whose box side is smaller (pixels); tiny faces still work but give blurry crops.
    ``min_relative_score``: ignore detections scoring below this fraction of the best detection's score
    (0 disables). "Largest face" is only meaningful among real faces: a weak false positive (the HOG detector
    scores the astronaut photo's shoulder badge 0.07 against 1.63 for her face) can have the bigger box.
    ``batch_size``: photos handed to the backend at once by :meth:`process` (the DFA aligns photos of one
    shape in one forward pass). In ``aligned`` mode a backend's own crop (the DFA's ``aligned_x``) is used
    as is; ``unaligned`` crops its box, ``prealigned`` reads keypoints on the crop itself.
    """

    # what "no usable face in this image" raises: kprpe.streaming skips such a frame (a listed failure for a
    # photo) instead of stopping the run
    skip_errors = (NoFaceFound, AlignmentError, LandmarkFileError)

    def __init__(
        self,
        detector: FaceDetector | None = None,
        *,
        mode: str = "aligned",
        all_faces: bool = False,
        min_face_size: float = 0.0,
        min_relative_score: float = 0.25,
        batch_size: int = 16,
    ) -> None:
        if mode not in ALIGN_MODES:
            raise ValueError(f"unknown alignment mode {mode!r}; choose one of {ALIGN_MODES}")
        if min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0, got {min_face_size}")
        if not 0 <= min_relative_score <= 1:
            raise ValueError(f"min_relative_score must be in [0, 1], got {min_relative_score}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.min_relative_score = float(min_relative_score)
        self.batch_size = int(batch_size)
        self._detector = detector
        self.mode = mode
        self.all_faces = all_faces
        self.min_face_size = float(min_face_size)

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            from .dlib_backend import DlibDetector

            self._detector = DlibDetector()
        return self._detector

    def describe(self) -> dict:
        return {"mode": self.mode, "all_faces": self.all_faces, "min_face_size": self.min_face_size,
                "min_relative_score": self.min_relative_score, "detector": self.detector.describe()}

    def largest_only(self) -> FacePipeline:
        """The same detection and cropping, keeping only the largest face (gallery enrolment)."""
        return FacePipeline(
            self.detector, mode=self.mode, all_faces=False, min_face_size=self.min_face_size
        )

    def faces_in_image(
        self, image: np.ndarray, *, source: str | os.PathLike | None = None
    ) -> list[AlignedFace]:
        """Crops of the faces in an RGB uint8 photo, largest first (only the largest unless ``all_faces``).

        Raises :class:`NoFaceFound` when there is none, :class:`AlignmentError` for bad keypoints.
        """
        if self.mode == "prealigned":
            if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
                raise AlignmentError(
                    f"mode 'prealigned' needs {CROP_SIZE}x{CROP_SIZE} crops, got "
                    f"{image.shape[1]}x{image.shape[0]}; "
                    "use mode 'aligned' or 'unaligned' for photos"
                )
            found = self.detector.landmarks_in_box(image, TEMPLATE_FACE_BOX, source=source)
            return [align_face(image, found.keypoints, mode="prealigned", box=found.box, score=found.score)]
        return self.faces_from_detections(image, self.detector.detect(image, source=source))

    def faces_from_detections(self, image: np.ndarray, detections: list) -> list[AlignedFace]:
        """Crops for a photo's detections: size and relative-score filters, largest first, cropped by mode."""
        if self.mode == "prealigned":
            return self.faces_in_image(image)
        if not detections:
            raise NoFaceFound(f"no face found ({_describe_short(self.detector)})")
        sizes = [min(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in detections]
        kept = [d for d, size in zip(detections, sizes, strict=True) if size >= self.min_face_size]
        if not kept:
            raise NoFaceFound(
                f"only faces smaller than min_face_size={self.min_face_size:g} px found (largest "
                f"{max(sizes):.0f} px)"
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
            if self.mode == "aligned" and detection.aligned is not None:
                crop, crop_keypoints = detection.aligned
                face = backend_aligned_face(
                    crop, crop_keypoints, detection.keypoints, box=detection.box, score=detection.score
                )
            else:
                face = align_face(
                    image, detection.keypoints, mode=self.mode, box=detection.box, score=detection.score
                )
            face.extra["landmarks"] = detection.landmarks
            face.extra["face_size"] = float(
                min(detection.box[2] - detection.box[0], detection.box[3] - detection.box[1])
            )
            faces.append(face)
        return faces

    def faces_in_file(self, path: str | os.PathLike) -> list[AlignedFace]:
        """Load a photo (any mode, EXIF-upright) and crop its faces; errors name the file."""
        image = load_image(path)
        try:
            return self.faces_in_image(image, source=path)
        except self.skip_errors as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def process(self, inputs: Iterable[str | os.PathLike], *, progress: bool = True) -> BatchResult:
        """Files and directories -> every face found, plus a failure entry for each photo that gave none.

        A failing photo (unreadable, not an image, no face) is reported and the rest continue. Every crop is
        kept in memory: for large sets use :meth:`iter_batches`.
        """
        result = BatchResult()
        for part in self.iter_batches(inputs, progress=progress):
            result.records.extend(part.records)
            result.failures.extend(part.failures)
        return result

    def iter_batches(
        self, inputs: Iterable[str | os.PathLike], *, progress: bool = True
    ) -> Iterator[BatchResult]:
        """:meth:`process`, one ``batch_size`` chunk of photos at a time, in input order.

        Only one chunk's photos and crops are held at once, so a caller that writes or embeds each chunk
        before asking for the next keeps memory bounded whatever the number of inputs.
        """
        paths = expand_image_paths(inputs)
        bar = tqdm(total=len(paths), desc="faces", unit="img", disable=None if progress else True)
        try:
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start : start + self.batch_size]
                result = self._process_chunk(chunk)
                bar.update(len(chunk))
                yield result
        finally:
            bar.close()

    def _process_chunk(self, chunk: list[Path]) -> BatchResult:
        """One chunk of photos: loaded, detected in one backend call, cropped; failures named per photo."""
        expected = (ImageLoadError, *self.skip_errors)
        result = BatchResult()
        images: dict[int, np.ndarray] = {}
        problems: dict[int, Exception] = {}
        for position, path in enumerate(chunk):
            try:
                images[position] = load_image(path)
            except ImageLoadError as exc:
                problems[position] = exc
        found: dict[int, object] = dict.fromkeys(images)  # None: crop in faces_in_image (prealigned)
        if self.mode != "prealigned" and images:
            answers = self.detector.detect_batch(
                list(images.values()), sources=[chunk[position] for position in images]
            )
            found = dict(zip(images, answers, strict=True))
        for position, path in enumerate(chunk):
            try:
                if position in problems:
                    raise problems[position]
                detections = found[position]
                if isinstance(detections, Exception):
                    raise detections
                faces = (
                    self.faces_in_image(images[position], source=path)
                    if detections is None
                    else self.faces_from_detections(images[position], detections)
                )
            except expected as exc:
                reason = exc.reason if isinstance(exc, ImageLoadError) else str(exc)
                result.failures.append((str(path), reason))
                continue
            for index, face in enumerate(faces):
                name = str(path) if index == 0 and not self.all_faces else f"{path}#{index}"
                result.records.append(
                    FaceRecord(name=name, source=str(path), face_index=index, face=face)
                )
        return result


def _describe_short(detector: FaceDetector) -> str:
    info = detector.describe()
    return ", ".join(f"{k}={v}" for k, v in info.items())


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
            "scores": [None if face.score is None else float(face.score) for face in self.faces],
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
