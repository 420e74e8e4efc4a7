"""Faces from image files: pre-aligned crops, or photos cropped from 5 landmarks at any point of the
alignment path (t=0 aligned, t=1 detector-box crop); plus the custom-data readers (pairs CSV, identity
folders)."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import KprpeError
from ..images import load_image
from .embedding import FaceSource
from .geometry import aligned_crop_params, box_crop_params, box_from_landmarks, interpolate_crop, warp_face
from .landmarks import LandmarkBackend, backend_tag, face_backend_landmarks, template_keypoints_for

__all__ = [
    "path_inside",
    "IMAGE_EXTENSIONS",
    "DataFormatError",
    "crop_face",
    "image_face_source",
    "read_pairs_csv",
    "IdentityImages",
    "list_images",
    "scan_identity_folders",
]

# The files a folder contributes to an evaluation. load_image reads more (kprpe.images.IMAGE_EXTENSIONS adds
# .gif, .pgm, .jfif, ...); this list stays as it was so that a folder's content, hence a result, does not
# move.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataFormatError(KprpeError, ValueError):
    """An input list or folder that does not have the documented layout (the message says where)."""


def crop_face(image: np.ndarray, landmarks_px: np.ndarray, t: float = 0.0, box: np.ndarray | None = None,
              size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Crop a face a fraction ``t`` of the way from the ArcFace alignment (0) to the box crop (1).

    ``box`` ``(x1, y1, x2, y2)`` is the detector box in continuous pixel coordinates (pixel centres at
    integers, as :mod:`kprpe.face.align`); without one, :func:`box_from_landmarks` stands in. At t=1 the crop
    is :func:`kprpe.face.align.unaligned_crop`, the face pipeline's own ``unaligned`` crop.
    Returns the crop and its normalised keypoints (the landmarks moved by the same warp).
    """
    if t == 1.0:
        from ..face.align import apply_transform, unaligned_crop  # eval loads face only when it crops

        box = box if box is not None else box_from_landmarks(landmarks_px)
        crop, matrix = unaligned_crop(image, box, size)
        return crop, apply_transform(matrix, landmarks_px) / size
    start = aligned_crop_params(landmarks_px, size)
    if t == 0.0:
        params = start
    else:
        end = box_crop_params(box if box is not None else box_from_landmarks(landmarks_px), size)
        params = interpolate_crop(start, end, t)
    return warp_face(image, landmarks_px, params, size)


@dataclass
class _Entry:
    path: Path
    key: str


def image_face_source(
    paths: list[Path],
    keys: list[str],
    *,
    landmarks: dict[str, np.ndarray] | None = None,
    boxes: dict[str, np.ndarray] | None = None,
    t: float = 0.0,
    keypoint_source: str = "template",
    size: int = 112,
    backend: LandmarkBackend | None = None,
) -> FaceSource:
    """Faces from files. With ``landmarks`` (pixel, keyed by ``keys``) every image is cropped by
    :func:`crop_face` at ``t``; without, images are taken as already aligned (resized to ``size``) and
    keypoints come from ``keypoint_source`` (``backend``: from ``backend``, default dlib; or ``template``)."""
    if len(paths) != len(keys):
        raise ValueError("paths and keys differ in length")
    if landmarks is not None:
        missing = [k for k in keys if k not in landmarks]
        if missing:
            raise DataFormatError(
                f"no landmarks for {len(missing)} of {len(keys)} images (first: {missing[0]!r})"
            )
    elif keypoint_source not in ("backend", "template"):
        raise ValueError(
            f"without landmarks the keypoint source must be backend or template, got {keypoint_source!r}"
        )

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        images, kps = [], []
        for i in range(start, stop):
            img = load_image(paths[i])
            if landmarks is not None:
                box = boxes.get(keys[i]) if boxes else None
                crop, kp = crop_face(img, landmarks[keys[i]], t, box, size)
                images.append(crop)
                kps.append(kp)
            else:
                if img.shape[:2] != (size, size):
                    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                images.append(img)
        images_arr = np.stack(images)
        if landmarks is not None:
            return images_arr, np.stack(kps)
        if keypoint_source == "backend":
            return images_arr, face_backend_landmarks(images_arr, backend)
        return images_arr, template_keypoints_for(stop - start)

    digest = hashlib.sha256()
    for p in paths:
        st = p.stat() if p.exists() else None
        digest.update(f"{p.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    mode = f"t={t:g}" if landmarks is not None else f"prealigned:{keypoint_source}"
    if landmarks is None and keypoint_source == "backend":
        mode += backend_tag(backend)
    if landmarks is not None:
        for k in keys:
            digest.update(landmarks[k].tobytes())
            if boxes and k in boxes:
                digest.update(np.asarray(boxes[k], dtype=np.float64).tobytes())
    return FaceSource(count=len(paths), load=load, fingerprint=f"files:{digest.hexdigest()}|{mode}")


def path_inside(root: Path, name: str, *, listed_in: str | os.PathLike = "") -> Path:
    """``root / name`` for a file name read from a data file, refusing names that leave ``root`` (``../x``,
    absolute paths, symlinked escapes): a metadata file must not make us read elsewhere."""
    candidate = Path(name)
    where = f" (listed in {listed_in})" if listed_in else ""
    if candidate.is_absolute() or ".." in candidate.parts:
        raise DataFormatError(f"image name {name!r}{where} points outside the image folder {root}")
    path = root / candidate
    if path.exists() and root.resolve() not in path.resolve().parents:
        raise DataFormatError(f"image name {name!r}{where} resolves outside the image folder {root}")
    return path


def read_pairs_csv(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """Pairs ``image_a,image_b,label`` (label 1/0 or true/false; an optional header row)."""
    path = Path(path)
    firsts, seconds, labels = [], [], []
    truth = {"1": True, "0": False, "true": True, "false": False, "same": True, "diff": False}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 3:
                raise DataFormatError(
                    f"{path}:{lineno}: expected 3 columns 'image_a,image_b,label', got {len(row)}"
                )
            label = truth.get(row[2].lower())
            if label is None:
                if lineno == 1:
                    continue  # header
                raise DataFormatError(f"{path}:{lineno}: label {row[2]!r} is not 1/0/true/false")
            firsts.append(row[0])
            seconds.append(row[1])
            labels.append(label)
    if not labels:
        raise DataFormatError(f"{path}: no pairs")
    return firsts, seconds, np.asarray(labels, dtype=bool)


@dataclass
class IdentityImages:
    """Image files with an identity label each."""

    paths: list[Path]
    labels: list[str]


def list_images(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively) with an extension of :data:`IMAGE_EXTENSIONS`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_identity_folders(root: str | os.PathLike, label_regex: str | None = None) -> IdentityImages:
    """Images under ``root``: identity = the sub-folder name (``root/<identity>/*.jpg``), or, with
    ``label_regex``, the first group of the regex matched on the file name (TinyFace: ``'^(\\d+)_'``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"not a folder: {root}")
    files = list_images(root)
    if not files:
        raise DataFormatError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    pattern = re.compile(label_regex) if label_regex else None
    labels = []
    for p in files:
        if pattern is not None:
            m = pattern.search(p.name)
            if m is None:
                raise DataFormatError(f"{p}: file name does not match --label-regex {label_regex!r}")
            labels.append(m.group(1) if m.groups() else m.group(0))
        else:
            rel = p.relative_to(root)
            if len(rel.parts) < 2:
                raise DataFormatError(
                    f"{p}: images must sit in identity sub-folders (root/<identity>/image), "
                    "or pass --label-regex"
                )
            labels.append(rel.parts[0])
    return IdentityImages(paths=files, labels=labels)
