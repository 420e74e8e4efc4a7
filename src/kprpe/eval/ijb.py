"""IJB-B / IJB-C 1:1 verification from the insightface meta files.

Files (names differ between IJB-B and IJB-C, so each path is given explicitly):

* ``*_face_tid_mid.txt``: ``image_name template_id media_id`` per face;
* ``*_template_pair_label.txt``: ``template_1 template_2 label`` per pair (label 1 genuine, 0 impostor);
* ``*_name_5pts_score.txt``: ``image_name x0 y0 ... x4 y4 detector_score`` per face, pixel coordinates in
  the loose crop;
* a folder of loose crops named ``image_name``.

Template features: per-face embeddings (flip-summed; by default kept un-normalised so the norm weighs
quality, and multiplied by the detector score) -> mean per media -> sum per template -> L2-normalise;
a pair's score is the cosine of its two templates.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .landmarks import LandmarkFileError, read_pixel_landmarks

__all__ = ["IJBMeta", "read_face_tid_mid", "read_template_pairs", "read_ijb_meta", "template_features",
           "template_pair_scores"]


def _rows(path: Path, expected: int, what: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each data line (blank lines and ``#`` comments skipped), checking the
    field count; fields are separated by white space or commas."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != expected:
                raise LandmarkFileError(
                    f"{path}:{lineno}: expected {expected} fields '{what}', got {len(parts)}: "
                    f"{line.strip()[:80]!r}"
                )
            yield lineno, parts


def _int(path: Path, lineno: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LandmarkFileError(f"{path}:{lineno}: {what} {text!r} is not an integer") from None


def read_face_tid_mid(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Face names, template ids and media ids."""
    path = Path(path)
    names, tids, mids = [], [], []
    for lineno, parts in _rows(path, 3, "image_name template_id media_id"):
        names.append(parts[0])
        tids.append(_int(path, lineno, parts[1], "template id"))
        mids.append(_int(path, lineno, parts[2], "media id"))
    if not names:
        raise LandmarkFileError(f"{path}: no faces")
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64)


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template pairs ``(t1, t2, label)``."""
    path = Path(path)
    t1, t2, labels = [], [], []
    for lineno, parts in _rows(path, 3, "template_1 template_2 label"):
        t1.append(_int(path, lineno, parts[0], "template id"))
        t2.append(_int(path, lineno, parts[1], "template id"))
        label = _int(path, lineno, parts[2], "label")
        if label not in (0, 1):
            raise LandmarkFileError(f"{path}:{lineno}: label {label} is not 0 or 1")
        labels.append(bool(label))
    if not labels:
        raise LandmarkFileError(f"{path}: no pairs")
    return np.asarray(t1, dtype=np.int64), np.asarray(t2, dtype=np.int64), np.asarray(labels, dtype=bool)


@dataclass
class IJBMeta:
    names: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    landmarks: dict[str, np.ndarray]
    detector_scores: np.ndarray  # per face, aligned with ``names``
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray


def read_ijb_meta(
    tid_mid: str | os.PathLike, pairs: str | os.PathLike, landmarks: str | os.PathLike
) -> IJBMeta:
    """Read and cross-check the three meta files."""
    names, tids, mids = read_face_tid_mid(tid_mid)
    points, scores = read_pixel_landmarks(landmarks)
    missing = [n for n in names if n not in points]
    if missing:
        raise LandmarkFileError(
            f"{landmarks}: no landmarks for {len(missing)} of {len(names)} faces listed in "
            f"{tid_mid} (first: {missing[0]!r})"
        )
    t1, t2, labels = read_template_pairs(pairs)
    known = set(np.unique(tids).tolist())
    unknown = sorted({int(t) for t in np.r_[t1, t2]} - known)
    if unknown:
        raise LandmarkFileError(
            f"{pairs}: {len(unknown)} template ids have no face in {tid_mid} (first: {unknown[0]})"
        )
    return IJBMeta(names=names, template_ids=tids, media_ids=mids, landmarks=points,
                   detector_scores=np.asarray([scores[n] for n in names], dtype=np.float64),
                   pair_t1=t1, pair_t2=t2, pair_labels=labels)


def template_features(embeddings: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray, *,
                      norms: np.ndarray | None = None, detector_scores: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Unit template features ``(T, D)`` and their sorted template ids ``(T,)``.

    Face features are the unit ``embeddings`` times ``norms`` (if given) times ``detector_scores`` (if
    given); they are averaged per (template, media), the media means summed per template, and normalised.
    """
    feats = np.asarray(embeddings, dtype=np.float64)
    if norms is not None:
        feats = feats * np.asarray(norms, dtype=np.float64)[:, None]
    if detector_scores is not None:
        feats = feats * np.asarray(detector_scores, dtype=np.float64)[:, None]
    pairs = np.stack([template_ids, media_ids], axis=1)
    media_keys, media_index = np.unique(pairs, axis=0, return_inverse=True)
    media_index = media_index.reshape(-1)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_index, feats)
    media_mean = media_sum / np.bincount(media_index, minlength=len(media_keys))[:, None]
    templates, template_index = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(templates), feats.shape[1]))
    np.add.at(template_sum, template_index.reshape(-1), media_mean)
    norm = np.linalg.norm(template_sum, axis=1, keepdims=True)
    return template_sum / np.maximum(norm, 1e-12), templates


def template_pair_scores(
    features: np.ndarray, templates: np.ndarray, t1: np.ndarray, t2: np.ndarray
) -> np.ndarray:
    """Cosine similarity of each template pair."""
    i1 = np.searchsorted(templates, t1)
    i2 = np.searchsorted(templates, t2)
    for ids, idx in ((t1, i1), (t2, i2)):
        bad = (idx >= templates.size) | (templates[np.minimum(idx, templates.size - 1)] != ids)
        if bad.any():
            raise ValueError(f"template id {int(ids[bad][0])} has no features")
    return np.einsum("ij,ij->i", features[i1], features[i2])
