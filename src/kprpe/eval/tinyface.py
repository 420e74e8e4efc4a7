"""TinyFace closed-set identification, as the official protocol computes it.

- **Sets**: probes; a gallery of the probes' matches (``Gallery_Match``) plus distractors
  (``Gallery_Distractor``). A distractor's label never matches any probe.
- **Labels**: the integer before the first ``_`` of the file name (``12_3.jpg`` -> 12), for probes and
matches.
- **Faces** are found by file name without folder or extension (the key the official code uses).
- **Score**: inner product of the L2-normalised flip-summed features (``normalize(f(x) + f(flip x))``).
- **Rank-k**: a probe succeeds at rank k when a gallery image of its identity is among its k best-scoring
  gallery images; the rate is over probes that have a match in the gallery. Reported for k = 1, 5, 20.
  Exact score ties between a match and a non-match count against the probe (the official code leaves their
  order to ``argsort``; real features do not tie).

Two layouts: the CVLface toolkit set (a ``save_to_disk`` folder with a ``path`` column and ``metadata.pt``
listing ``image_paths``, ``probe_paths``, ``gallery_paths``, ``distractor_paths``), or the original TinyFace
``Testing_Set`` folder with ``Probe/``, ``Gallery_Match/`` and ``Gallery_Distractor/``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import DataFormatError, list_images

__all__ = [
    "TINYFACE_RANKS",
    "TINYFACE_FOLDERS",
    "TinyFaceProtocol",
    "tinyface_key",
    "tinyface_label",
    "first_match_ranks",
    "tinyface_identification",
    "is_tinyface_folder",
    "tinyface_folder_lists",
]

TINYFACE_RANKS = (1, 5, 20)
TINYFACE_FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")


def tinyface_key(path: str) -> str:
    """How the protocol names a face: its file name without folder and extension."""
    return os.path.splitext(os.path.basename(str(path)))[0]


def tinyface_label(path: str) -> int:
    """The identity of a probe or gallery-match image: the integer before the first ``_`` of its file name."""
    prefix = os.path.basename(str(path)).split("_")[0]
    try:
        return int(prefix)
    except ValueError:
        raise DataFormatError(
            f"{path}: TinyFace labels come from the file-name prefix '<id>_...', got {prefix!r}"
        ) from None


@dataclass
class TinyFaceProtocol:
    """Which feature rows are probes, gallery matches and distractors, and the labels of the first two."""

    probe_rows: np.ndarray
    match_rows: np.ndarray
    distractor_rows: np.ndarray
    probe_labels: np.ndarray
    match_labels: np.ndarray

    @classmethod
    def from_paths(
        cls,
        image_paths: Sequence[str],
        probe_paths: Sequence[str],
        gallery_paths: Sequence[str],
        distractor_paths: Sequence[str],
        where: str = "TinyFace",
    ) -> TinyFaceProtocol:
        """``image_paths[i]`` names feature row ``i``; the three lists name probes, matches and distractors.

        Rows are found by :func:`tinyface_key`. When two images share a key the later one is used, as in the
        official code (with a warning: the protocol lists are then ambiguous).
        """
        row_of: dict[str, int] = {}
        duplicates = []
        for i, p in enumerate(image_paths):
            key = tinyface_key(p)
            if key in row_of:
                duplicates.append(key)
            row_of[key] = i
        if duplicates:
            warnings.warn(
                f"{where}: {len(duplicates)} images share a file name with another (first: "
                f"{duplicates[0]!r}); the later one is used, as the official protocol does",
                stacklevel=2,
            )

        def rows(paths: Sequence[str], role: str) -> np.ndarray:
            missing = [p for p in paths if tinyface_key(p) not in row_of]
            if missing:
                raise DataFormatError(
                    f"{where}: {len(missing)} {role} images are not in the set (first: {missing[0]})"
                )
            return np.array([row_of[tinyface_key(p)] for p in paths], dtype=np.int64)

        if not probe_paths or not gallery_paths:
            raise DataFormatError(
                f"{where}: the protocol needs probes and gallery matches "
                f"({len(probe_paths)} probes, {len(gallery_paths)} matches)"
            )
        return cls(
            probe_rows=rows(probe_paths, "probe"),
            match_rows=rows(gallery_paths, "gallery"),
            distractor_rows=rows(distractor_paths, "distractor"),
            probe_labels=np.array([tinyface_label(p) for p in probe_paths], dtype=np.int64),
            match_labels=np.array([tinyface_label(p) for p in gallery_paths], dtype=np.int64),
        )


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def first_match_ranks(
    probe_features: np.ndarray,
    match_features: np.ndarray,
    distractor_features: np.ndarray,
    probe_labels: np.ndarray,
    match_labels: np.ndarray,
    chunk: int = 128,
) -> np.ndarray:
    """Rank (1-based) of each probe's best-scoring gallery match among all gallery images, 0 when the probe
    has no match. Score: inner product of unit features. Distractors never match. Probes are processed in
    chunks so the probe x gallery score matrix is never held whole (TinyFace: 3.7k x 157k)."""
    probes, matches, distractors = _unit(probe_features), _unit(match_features), _unit(distractor_features)
    probe_labels, match_labels = np.asarray(probe_labels), np.asarray(match_labels)
    ranks = np.zeros(probes.shape[0], dtype=np.int64)
    for start in range(0, probes.shape[0], chunk):
        p = probes[start : start + chunk]
        mated = probe_labels[start : start + chunk, None] == match_labels[None, :]
        match_scores = p @ matches.T
        best = np.where(mated, match_scores, -np.inf).max(axis=1)
        above = np.sum((match_scores >= best[:, None]) & ~mated, axis=1)
        if distractors.shape[0]:
            above += np.sum(p @ distractors.T >= best[:, None], axis=1)
        ranks[start : start + chunk] = np.where(mated.any(axis=1), above + 1, 0)
    return ranks


def tinyface_identification(
    features: np.ndarray, protocol: TinyFaceProtocol, ranks: Sequence[int] = TINYFACE_RANKS
) -> dict:
    """Rank-k identification rates (fractions) of the probes with a match, and the set's sizes."""
    features = np.asarray(features)
    rank_of = first_match_ranks(
        features[protocol.probe_rows],
        features[protocol.match_rows],
        features[protocol.distractor_rows],
        protocol.probe_labels,
        protocol.match_labels,
    )
    mated = rank_of[rank_of > 0]
    if mated.size == 0:
        raise DataFormatError("no TinyFace probe has a match in the gallery; rank-k is undefined")
    return dict(
        num_probes=int(rank_of.size),
        num_mated_probes=int(mated.size),
        num_gallery=int(protocol.match_rows.size + protocol.distractor_rows.size),
        num_gallery_match=int(protocol.match_rows.size),
        num_distractors=int(protocol.distractor_rows.size),
        closed_set={f"rank{k}": float(np.mean(mated <= k)) for k in ranks},
        cmc=[float(np.mean(mated <= k)) for k in range(1, 51)],
    )


def is_tinyface_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` has the original TinyFace test layout (Probe/, Gallery_Match/,
    Gallery_Distractor/)."""
    p = Path(path)
    return all((p / name).is_dir() for name in TINYFACE_FOLDERS)


def tinyface_folder_lists(path: str | os.PathLike) -> tuple[list[Path], list[Path], list[Path]]:
    """Probe, gallery-match and distractor image files of an original TinyFace test folder."""
    p = Path(path)
    lists = tuple(list_images(p / name) for name in TINYFACE_FOLDERS)
    for name, files in zip(TINYFACE_FOLDERS, lists, strict=True):
        if not files and name != "Gallery_Distractor":
            raise DataFormatError(f"{p / name}: no images")
    return lists
