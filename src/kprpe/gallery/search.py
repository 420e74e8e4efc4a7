"""What every gallery search shares: the gallery folder layout, exact top-k ranking, the hit type and the
error. :class:`~kprpe.gallery.index.GalleryIndex` is the one index built on them.

``LEGACY_INDEX_FORMAT`` names the v1 index files (``identities``, ``embeddings``, ``counts``, ``metadata``)
written before the gallery index existed; :meth:`GalleryIndex.load` still reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from ..images import IMAGE_EXTENSIONS

__all__ = [
    "GalleryIndexError",
    "LEGACY_INDEX_FORMAT",
    "SearchHit",
    "check_compatible",
    "exact_top_k",
    "gallery_images",
    "unit_queries",
]

LEGACY_INDEX_FORMAT = "kprpe-face-index-v1"


class GalleryIndexError(KprpeError, ValueError):
    """A gallery, an index file, a name or a query is unusable; the message says which and why."""


@dataclass
class SearchHit:
    identity: str
    score: float


def unit_queries(queries, dim: int) -> np.ndarray:
    """Queries ``(n, dim)`` (or one ``(dim,)``) as float32 unit rows: scores against unit templates are then
    cosines whatever the caller's scale (a raw model output's norm carries quality, not identity)."""
    queries = np.asarray(queries, dtype=np.float64)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise GalleryIndexError(
            f"queries are {queries.shape[1:]}-shaped but the gallery holds {dim}-d templates"
        )
    if not np.isfinite(queries).all():
        raise GalleryIndexError("queries contain NaN or infinity")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise GalleryIndexError(f"query {int(np.argmin(norms))} has zero norm: it has no direction to search")
    return (queries / norms).astype(np.float32)


def check_compatible(metadata: dict, dim: int, fingerprint: str, output_dim: int | None = None) -> None:
    """Refuse a query model other than the one a gallery (file or database) was enrolled with."""
    expected = metadata.get("model_fingerprint")
    if expected and expected != fingerprint:
        raise GalleryIndexError(
            "the index was enrolled with different weights than the query model "
            f"(fingerprint {expected[:12]}... vs {fingerprint[:12]}...); re-enrol or use the same "
            "--weights"
        )
    if output_dim and output_dim != dim:
        raise GalleryIndexError(f"index templates are {dim}-d but the model gives {output_dim}-d embeddings")


def gallery_images(gallery: str | os.PathLike) -> dict[str, list[Path]]:
    """``GALLERY/<identity>/*.jpg`` -> ``{identity: [images]}``; loose images in GALLERY count as
    ``<stem>``."""
    root = Path(gallery)
    if not root.is_dir():
        raise GalleryIndexError(f"gallery {root} is not a directory (expected one sub-folder per identity)")
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            images = sorted(
                p
                for p in entry.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if images:
                found.setdefault(entry.name, []).extend(images)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(entry.stem, []).append(entry)
    if not found:
        raise GalleryIndexError(f"gallery {root} holds no images (expected {root}/<identity>/<image>)")
    return found


def exact_top_k(
    queries: np.ndarray,
    templates: np.ndarray,
    k: int,
    valid: np.ndarray | None = None,
    chunk_rows: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``templates`` by inner product (float64) for each query.

    Ranking: score descending, ties by lower row first (what a stable ``argsort`` gives). Works through the
    gallery in chunks so 1M x 512 never needs a float64 copy of the whole matrix. Rows with ``valid`` False
    are skipped. Returns ``(rows, scores)`` of shape ``(N, min(k, #valid))``.
    """
    queries = np.asarray(queries, dtype=np.float64)
    if queries.ndim == 1:
        queries = queries[None]
    count = templates.shape[0]
    usable = count if valid is None else int(np.count_nonzero(valid[:count]))
    width = min(k, usable)
    if width == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float64)
    picked_rows, picked_scores = [], []
    for start in range(0, count, chunk_rows):
        block = np.asarray(templates[start : start + chunk_rows], dtype=np.float64)
        scores = queries @ block.T
        if valid is not None:
            scores[:, ~valid[start : start + block.shape[0]]] = -np.inf
        take = min(width, block.shape[0])
        if take < block.shape[0]:
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
            ties = np.count_nonzero(scores >= kth[:, None], axis=1) > take
            for row in np.nonzero(ties)[
                0
            ]:  # rare: equal scores at the cut; keep the lowest rows like argsort
                part[row] = np.argsort(-scores[row], kind="stable")[:take]
        else:
            part = np.broadcast_to(np.arange(block.shape[0]), scores.shape).copy()
        picked_rows.append(part + start)
        picked_scores.append(np.take_along_axis(scores, part, axis=1))
    rows = np.concatenate(picked_rows, axis=1)
    scores = np.concatenate(picked_scores, axis=1)
    order = np.lexsort((rows, -scores), axis=-1)[:, :width]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
