"""A face index for identification: enrol a gallery of identities, then rank identities for a query face.

Each identity is the L2-normalised mean of its images' unit embeddings (a common, robust template). The
index file is a plain ``.npz`` (loads with ``allow_pickle=False``): ``identities`` (unicode), ``embeddings``
``(I, D)`` float32, ``counts`` ``(I,)``, ``metadata`` (a JSON string with the model fingerprint, crop mode and
flip setting so queries can be checked against the index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from ..face.embedder import FaceEmbedder
from ..face.pipeline import FacePipeline
from ..files import read_npz, write_npz
from ..images import IMAGE_EXTENSIONS

__all__ = ["FaceIndex", "FaceIndexError", "SearchHit", "gallery_images", "INDEX_FORMAT"]

INDEX_FORMAT = "kprpe-face-index-v1"


class FaceIndexError(KprpeError, ValueError):
    """An index file is missing, malformed or made with a different model than the query."""


@dataclass
class SearchHit:
    identity: str
    score: float


def gallery_images(gallery: str | os.PathLike) -> dict[str, list[Path]]:
    """``GALLERY/<identity>/*.jpg`` -> ``{identity: [images]}``; loose images in GALLERY count as
    ``<stem>``."""
    root = Path(gallery)
    if not root.is_dir():
        raise FaceIndexError(f"gallery {root} is not a directory (expected one sub-folder per identity)")
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
        raise FaceIndexError(f"gallery {root} holds no images (expected {root}/<identity>/<image>)")
    return found


@dataclass
class FaceIndex:
    """Identity templates ``(I, D)`` (unit rows) with their names and image counts."""

    identities: list[str]
    embeddings: np.ndarray
    counts: np.ndarray
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32).reshape(len(self.identities), -1)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(len(self.identities))
        if len(set(self.identities)) != len(self.identities):
            raise FaceIndexError("identity names in an index must be unique")

    def __len__(self) -> int:
        return len(self.identities)

    @classmethod
    def from_embeddings(cls, per_identity: dict[str, np.ndarray], metadata: dict | None = None) -> FaceIndex:
        """``{identity: unit embeddings (n, D)}`` -> index of normalised mean templates."""
        names, templates, counts = [], [], []
        for name, rows in per_identity.items():
            rows = np.asarray(rows, dtype=np.float64)
            if rows.ndim != 2 or rows.shape[0] == 0:
                continue
            mean = rows.mean(axis=0)
            templates.append(mean / max(np.linalg.norm(mean), 1e-12))
            names.append(name)
            counts.append(rows.shape[0])
        dim = templates[0].shape[0] if templates else 0
        return cls(
            names,
            np.asarray(templates, np.float32).reshape(len(names), dim),
            np.asarray(counts),
            dict(metadata or {}),
        )

    @classmethod
    def enrol(
        cls,
        gallery: str | os.PathLike,
        *,
        pipeline: FacePipeline,
        embedder: FaceEmbedder,
        progress: bool = True,
    ) -> tuple[FaceIndex, list[tuple[str, str]]]:
        """Embed every gallery image (largest face each); returns the index and the images that failed.

        Streams (:mod:`kprpe.streaming.stream`): only the embeddings are kept, never every crop."""
        from ..streaming.stream import stream_embeddings

        per_identity_paths = gallery_images(gallery)
        all_paths = [p for paths in per_identity_paths.values() for p in paths]
        single = FacePipeline(
            pipeline.detector, mode=pipeline.mode, all_faces=False, min_face_size=pipeline.min_face_size
        )
        identity_of = {str(p): name for name, paths in per_identity_paths.items() for p in paths}
        grouped: dict[str, list[np.ndarray]] = {}
        failures = []
        for done in stream_embeddings(
            all_paths, pipeline=single, embedder=embedder, progress=progress, paths=all_paths
        ):
            if done.failure is not None:
                failures.append((done.task.path, done.failure))
            for row in done.rows:
                grouped.setdefault(identity_of[done.task.path], []).append(row.embedding)
        for name in per_identity_paths:
            if name not in grouped:
                failures.append(
                    (str(Path(gallery) / name), "identity dropped: no usable face in any of its images")
                )
        metadata = {
            "format": INDEX_FORMAT,
            "model_fingerprint": embedder.fingerprint,
            "output_dim": embedder.output_dim,
            "flip": embedder.flip,
            "pipeline": pipeline.describe(),
        }
        index = cls.from_embeddings({name: np.stack(rows) for name, rows in grouped.items()}, metadata)
        return index, failures

    def save(self, path: str | os.PathLike) -> Path:
        return write_npz(
            path,
            identities=np.asarray(self.identities, dtype=str),
            embeddings=self.embeddings,
            counts=self.counts,
            metadata=np.asarray(json.dumps(self.metadata)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaceIndex:
        path = Path(path)
        if not path.is_file():
            raise FaceIndexError(f"index file {path} does not exist")
        try:
            data = read_npz(path)
        except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
            raise FaceIndexError(f"index file {path} is not a plain kprpe index ({exc})") from None
        except (OSError, EOFError) as exc:
            raise FaceIndexError(f"index file {path} is not a readable .npz ({exc})") from None
        missing = [k for k in ("identities", "embeddings", "counts", "metadata") if k not in data]
        if missing:
            raise FaceIndexError(f"index file {path} lacks arrays {missing}")
        try:
            metadata = json.loads(str(data["metadata"]))
        except json.JSONDecodeError as exc:
            raise FaceIndexError(f"index file {path}: metadata is not JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise FaceIndexError(
                f"index file {path}: metadata is a JSON {type(metadata).__name__}, expected an object"
            )
        if data["identities"].dtype.kind != "U" or data["embeddings"].dtype.kind != "f":
            raise FaceIndexError(
                f"index file {path}: identities must be strings and embeddings floats, got "
                f"{data['identities'].dtype} and {data['embeddings'].dtype}"
            )
        if metadata.get("format") != INDEX_FORMAT:
            raise FaceIndexError(
                f"index file {path}: unknown format {metadata.get('format')!r} (expected {INDEX_FORMAT})"
            )
        identities = [str(x) for x in data["identities"].tolist()]
        embeddings = data["embeddings"]
        if embeddings.ndim != 2 or embeddings.shape[0] != len(identities):
            raise FaceIndexError(
                f"index file {path}: embeddings {embeddings.shape} do not match {len(identities)} identities"
            )
        return cls(identities, embeddings, data["counts"], metadata)

    def check_compatible(self, embedder: FaceEmbedder) -> None:
        """Raise unless the query model is the one the index was enrolled with."""
        expected = self.metadata.get("model_fingerprint")
        if expected and expected != embedder.fingerprint:
            raise FaceIndexError(
                "the index was enrolled with different weights than the query model "
                f"(fingerprint {expected[:12]}... vs {embedder.fingerprint[:12]}...); re-enrol or use the "
                "same --weights"
            )
        if self.embeddings.shape[1] not in (0, embedder.output_dim):
            raise FaceIndexError(
                f"index embeddings are {self.embeddings.shape[1]}-d but the model gives "
                f"{embedder.output_dim}-d"
            )

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """Top-``k`` identities (cosine similarity, best first) for each unit query embedding ``(N, D)``."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        if queries.shape[1] != self.embeddings.shape[1]:
            raise FaceIndexError(
                f"queries are {queries.shape[1]}-d but the index holds {self.embeddings.shape[1]}-d "
                "embeddings"
            )
        top, scores = exact_top_k(queries, self.embeddings, k)
        return [
            [SearchHit(self.identities[j], float(s)) for j, s in zip(row, score, strict=True)]
            for row, score in zip(top, scores, strict=True)
        ]

    def search_faces(self, faces: Sequence, embedder: FaceEmbedder, k: int = 5) -> list[list[SearchHit]]:
        self.check_compatible(embedder)
        unit, _ = embedder.embed_faces(faces)
        return self.search(unit, k)


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
