"""A gallery index that scales: identity templates searched with FAISS, or NumPy when FAISS is absent.

Each identity is one template: the L2-normalised mean of the unit embeddings of its images (the IJB template
pooling). Identities can be added, grown with more images, and removed without rebuilding anything.

Search is exact inner product by default (FAISS ``IndexFlatIP``, or the NumPy fallback :func:`exact_top_k`,
which gives the same ranking). Above ``approximate_above`` identities the FAISS backend switches to an IVF
index (``IndexIVFFlat``: inverted lists that support adding and removing ids after training; HNSW cannot
remove) searched with ``nprobe`` lists; docs/serving.md gives its recall and latency at 1M entries.

Each identity also records which images it has pooled, by content (the SHA-256 of the file's bytes, see
:func:`image_digest`), so ``enrol --append`` can skip an image that is already in its template; images pooled
without a digest (older files, ``add`` without ``digests``) count as unknown: ``count - len(record)``.

The index file is one ``.npz`` that loads with ``allow_pickle=False``: names, templates, pooled-sum norms,
image counts, the image record (``image_digests`` ``(M, 32)`` uint8 with their slots, ``image_digest_slots``),
a JSON metadata string (model fingerprint, crop settings, index settings) and, for IVF only, the trained FAISS
index as bytes (``faiss.serialize_index``; the exact index is rebuilt from the templates).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_path
from .search import (
    LEGACY_INDEX_FORMAT,
    GalleryIndexError,
    SearchHit,
    check_compatible,
    exact_top_k,
    gallery_images,
    unit_queries,
)

__all__ = [
    "GALLERY_INDEX_FORMAT",
    "INDEX_BACKENDS",
    "DEFAULT_APPROXIMATE_ABOVE",
    "DEFAULT_NPROBE",
    "DIGEST_SIZE",
    "EnrolReport",
    "GalleryIndex",
    "GalleryIndexError",
    "enrol_gallery",
    "enrol_gallery_report",
    "exact_top_k",
    "faiss_available",
    "image_digest",
]

GALLERY_INDEX_FORMAT = "kprpe-gallery-index-v2"
INDEX_BACKENDS = ("auto", "faiss", "numpy")
# Below this many identities exact search is fast enough (about 10 ms per query at 100k x 512 on one core).
DEFAULT_APPROXIMATE_ABOVE = 200_000
DEFAULT_NPROBE = 64
# A stored template is a float64 unit vector rounded to float32: its norm is 1 within 2^-24 (6e-8). 1e-3 also
# admits a float16 copy (2^-11) and still refuses a rescaled template (x1000 scored ~988 as "same").
UNIT_NORM_TOLERANCE = 1e-3
_FAISS_HINT = "install the optional extra: pip install 'kprpe[index]' (faiss-cpu)"
DIGEST_SIZE = 32  # SHA-256


def image_digest(path: str | os.PathLike) -> bytes:
    """The SHA-256 of a file's bytes: the image's identity in an identity's record, whatever its name or
    folder (a renamed or moved copy is the same image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _check_digests(digests, count: int) -> list[bytes]:
    digests = list(digests)
    if len(digests) != count:
        raise GalleryIndexError(f"got {len(digests)} image digests for {count} embeddings")
    for digest in digests:
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise GalleryIndexError(
                f"image digests must be {DIGEST_SIZE}-byte SHA-256 digests, got {digest!r:.80}"
            )
    return digests


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError:
        raise GalleryIndexError(f"the faiss backend needs faiss; {_FAISS_HINT}") from None
    return faiss


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise GalleryIndexError(
            f"identity names must be non-empty strings without NUL characters, got {name!r}"
        )
    return name


class GalleryIndex:
    """Identity templates with a FAISS (or NumPy) search structure kept in step.

    ``backend``: ``auto`` (FAISS when installed), ``faiss`` or ``numpy`` (exact only). ``approximate_above``:
    identity count at which the FAISS backend trains an IVF index (``None`` or 0: always exact).
    ``nlist``: IVF lists (default ``sqrt(N)``); ``nprobe``: lists visited per query (recall vs speed).
    """

    def __init__(
        self,
        dim: int,
        *,
        metadata: dict | None = None,
        backend: str = "auto",
        approximate_above: int | None = DEFAULT_APPROXIMATE_ABOVE,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
    ) -> None:
        if backend not in INDEX_BACKENDS:
            raise GalleryIndexError(f"unknown index backend {backend!r}; choose one of {INDEX_BACKENDS}")
        if dim <= 0:
            raise GalleryIndexError(f"embedding dimension must be positive, got {dim}")
        if nprobe <= 0:
            raise GalleryIndexError(f"nprobe must be positive, got {nprobe}")
        if approximate_above is not None and approximate_above < 0:
            raise GalleryIndexError(
                f"approximate_above must be >= 0 (0: always exact), got {approximate_above}"
            )
        if nlist is not None and nlist <= 0:
            raise GalleryIndexError(f"nlist must be positive, got {nlist}")
        if backend == "auto":
            backend = "faiss" if faiss_available() else "numpy"
        elif backend == "faiss":
            _faiss()
        self.dim = int(dim)
        self.backend = backend
        self.metadata = dict(metadata or {})
        self.approximate_above = int(approximate_above or 0)
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.kind = "exact"
        self._names: list[str] = []  # slot -> name ("" for a removed slot)
        self._slot: dict[str, int] = {}
        self._templates = np.zeros((0, self.dim), np.float32)
        self._sum_norms = np.zeros((0,), np.float64)  # |sum of unit embeddings|: template * norm = pooled sum
        self._counts = np.zeros((0,), np.int64)
        # the image record: the file's rows sorted by slot (looked up by bisection, not turned into a million
        # Python objects at load), plus what was pooled since; a removed slot's rows are ignored, then dropped
        # on save (slots are never reused)
        self._digest_slots = np.zeros((0,), np.int64)
        self._digest_rows = np.zeros((0, DIGEST_SIZE), np.uint8)
        self._digests_added: dict[int, list[bytes]] = {}
        self._faiss_index = self._new_flat() if backend == "faiss" else None

    # ------------------------------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, name: object) -> bool:
        return name in self._slot

    @property
    def names(self) -> list[str]:
        return [name for name in self._names if name]

    def count(self, name: str) -> int:
        return int(self._counts[self._lookup(name)])

    def template(self, name: str) -> np.ndarray:
        return self._templates[self._lookup(name)].copy()

    @property
    def template_rows(self) -> np.ndarray:
        """Every slot's template ``(slots, dim)``, row ``r`` being what :meth:`search_rows` returns as ``r``
        (a removed identity leaves its row unused); a read-only view, not a copy (1M x 512 is 2 GiB)."""
        view = self._templates[: len(self._names)].view()
        view.flags.writeable = False
        return view

    def pooled_rows(self, names: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(templates, sum_norms, counts)`` of ``names`` as float64 / float64 / int64 copies: what a copy of
        these identities elsewhere (a vector database) needs to go on pooling them."""
        slots = np.array([self._lookup(name) for name in names], dtype=np.int64)
        return (
            self._templates[slots].astype(np.float64),
            self._sum_norms[slots].copy(),
            self._counts[slots].copy(),
        )

    def _recorded(self, slot: int) -> list[bytes]:
        if not self._names[slot]:
            return []
        lo, hi = np.searchsorted(self._digest_slots, [slot, slot + 1])
        return [row.tobytes() for row in self._digest_rows[lo:hi]] + self._digests_added.get(slot, [])

    def image_records(self, names: Iterable[str]) -> dict[str, tuple[frozenset[bytes], int]]:
        """``{name: (digests of the images recorded as pooled, image count)}`` for the names in the index
        (others left out). ``count - len(digests)`` images were pooled without a record."""
        found = {}
        for name in names:
            slot = self._slot.get(name)
            if slot is not None:
                found[name] = (frozenset(self._recorded(slot)), int(self._counts[slot]))
        return found

    def describe(self) -> dict:
        info = {
            "backend": self.backend,
            "kind": self.kind,
            "identities": len(self),
            "approximate_above": self.approximate_above or None,
        }
        if self.kind == "ivf":
            info.update(nlist=int(self._faiss_index.nlist), nprobe=self.nprobe)
        return info

    def _lookup(self, name: str) -> int:
        slot = self._slot.get(name)
        if slot is None:
            raise GalleryIndexError(f"identity {name!r} is not in the index")
        return slot

    def _grow(self, extra: int) -> None:
        needed = len(self._names) + extra
        if needed <= self._templates.shape[0]:
            return
        capacity = max(needed, int(self._templates.shape[0] * 1.5) + 16)
        for attr in ("_templates", "_sum_norms", "_counts"):
            old = getattr(self, attr)
            new = np.zeros((capacity, *old.shape[1:]), old.dtype)
            new[: old.shape[0]] = old
            setattr(self, attr, new)

    # ---------------------------------------------------------------------------------------- add/remove

    def add(self, per_identity: Mapping[str, np.ndarray]) -> None:
        """Pool unit embeddings ``{name: (n, D)}`` into the templates; new names become new identities."""
        names, blocks = [], []
        for name, rows in per_identity.items():
            rows = np.asarray(rows, dtype=np.float64)
            rows = rows[None] if rows.ndim == 1 else rows
            if rows.ndim != 2 or rows.shape[1] != self.dim:
                raise GalleryIndexError(
                    f"identity {name!r}: embeddings must be (n, {self.dim}), got {rows.shape}"
                )
            names.extend([name] * rows.shape[0])
            blocks.append(rows)
        if names:
            self.add_embeddings(names, np.concatenate(blocks))

    def add_embeddings(self, names, embeddings: np.ndarray, *, digests=None, chunk_rows: int = 65536) -> None:
        """Pool row ``i`` of ``embeddings`` ``(n, D)`` into identity ``names[i]`` (names may repeat).

        ``digests``: the :func:`image_digest` of each row's image, recorded in its identity's record; an
        image already recorded for that identity is refused (pooling it again would count it twice).
        Everything is checked before anything changes; the work goes in chunks so a million rows need no
        float64 copy of the whole batch.
        """
        names = [_check_name(name) for name in names]
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape != (len(names), self.dim):
            raise GalleryIndexError(
                f"embeddings must be ({len(names)}, {self.dim}) for {len(names)} names, "
                f"got {embeddings.shape}"
            )
        if digests is not None:
            digests = _check_digests(digests, len(names))
            seen: dict[str, set[bytes]] = {}
            for name, digest in zip(names, digests, strict=True):
                if name not in seen:
                    seen[name] = set(self._recorded(self._slot[name])) if name in self._slot else set()
                if digest in seen[name]:
                    raise GalleryIndexError(
                        f"identity {name!r}: image {digest.hex()[:16]}... is already pooled into its template"
                    )
                seen[name].add(digest)
        for start in range(0, len(names), chunk_rows):
            rows = embeddings[start : start + chunk_rows].astype(np.float64)
            if not np.isfinite(rows).all():
                bad = start + int(np.nonzero(~np.isfinite(rows).all(axis=1))[0][0])
                raise GalleryIndexError(f"identity {names[bad]!r}: embedding {bad} contains NaN or infinity")
            norms = np.linalg.norm(rows, axis=1)
            if (norms < 1e-12).any():
                bad = start + int(np.nonzero(norms < 1e-12)[0][0])
                raise GalleryIndexError(f"identity {names[bad]!r}: embedding {bad} has zero norm")
        self._grow(len(set(names).difference(self._slot)))  # one allocation for the whole batch
        for start in range(0, len(names), chunk_rows):
            rows = embeddings[start : start + chunk_rows].astype(np.float64)
            self._pool(names[start : start + chunk_rows], rows / np.linalg.norm(rows, axis=1, keepdims=True))
            if digests is not None:  # recorded with the chunk that pooled them
                for i in range(start, min(start + chunk_rows, len(names))):
                    name, digest = names[i], digests[i]
                    self._digests_added.setdefault(self._slot[name], []).append(digest)

    def _pool(self, names: list[str], unit: np.ndarray) -> None:
        unique, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
        unique = [str(name) for name in unique]
        if len(unique) == len(names):
            sums = np.empty_like(unit)
            sums[inverse] = unit
        else:
            sums = np.zeros((len(unique), self.dim))
            np.add.at(sums, inverse, unit)
        known = np.array([name in self._slot for name in unique], dtype=bool)
        existing = np.array([self._slot[name] for name in unique if name in self._slot], dtype=np.int64)
        pooled = sums
        pooled[known] += self._templates[existing].astype(np.float64) * self._sum_norms[existing, None]
        norm = np.linalg.norm(pooled, axis=1)
        if not np.isfinite(norm).all():  # never write a template no later command can load
            raise GalleryIndexError(
                f"identity {unique[int(np.argmin(np.isfinite(norm)))]!r}: its pooled template is not finite "
                "(the index holds a non-finite template or sum norm)"
            )
        if (norm < 1e-12).any():  # the images cancel out exactly: no direction to keep
            raise GalleryIndexError(
                f"identity {unique[int(np.argmin(norm))]!r}: pooled embeddings sum to zero"
            )
        new_names = [name for name in unique if name not in self._slot]
        self._grow(len(new_names))
        for name in new_names:
            self._slot[name] = len(self._names)
            self._names.append(name)
        slots = np.array([self._slot[name] for name in unique], dtype=np.int64)
        self._templates[slots] = (pooled / norm[:, None]).astype(np.float32)
        self._sum_norms[slots] = norm
        self._counts[slots] += np.bincount(inverse, minlength=len(unique))
        if self._faiss_index is not None:
            if existing.size:
                self._faiss_index.remove_ids(existing)
            self._faiss_index.add_with_ids(np.ascontiguousarray(self._templates[slots]), slots)
            if self.kind == "exact" and self.approximate_above and len(self) >= self.approximate_above:
                self.build_approximate()

    def remove(self, names: Iterable[str]) -> list[str]:
        """Drop identities (unknown names are an error, checked before anything changes)."""
        names = list(dict.fromkeys(names))
        unknown = [name for name in names if name not in self._slot]
        if unknown:
            raise GalleryIndexError(f"cannot remove identities that are not in the index: {unknown[:5]}")
        slots = np.array([self._slot.pop(name) for name in names], dtype=np.int64)
        for slot in slots:
            self._names[slot] = ""
            self._digests_added.pop(int(slot), None)  # the file's rows of a removed slot are dropped on save
        self._templates[slots] = 0.0
        self._sum_norms[slots] = 0.0
        self._counts[slots] = 0
        if self._faiss_index is not None and slots.size:
            self._faiss_index.remove_ids(slots)
        return names

    # -------------------------------------------------------------------------------------------- faiss

    def _new_flat(self):
        faiss = _faiss()
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def build_approximate(self, nlist: int | None = None) -> None:
        """Train an IVF index on the live templates and move every identity into it. Called once, when the
        index crosses ``approximate_above``; call it yourself to switch earlier (``nlist``: lists, default
        ``sqrt(N)``). Later additions and removals go into the trained lists without retraining."""
        faiss = _faiss()
        if self.backend != "faiss":
            raise GalleryIndexError("an approximate index needs the faiss backend")
        live = np.nonzero(self._counts[: len(self._names)] > 0)[0].astype(np.int64)
        if live.size == 0:
            raise GalleryIndexError("cannot train an approximate index on an empty gallery")
        self.nlist = nlist or self.nlist
        nlist = self.nlist or max(1, int(math.sqrt(live.size)))
        nlist = min(nlist, live.size)
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        sample = live
        if live.size > 64 * nlist:
            sample = np.sort(np.random.default_rng(0).choice(live, 64 * nlist, replace=False))
        ivf.train(np.ascontiguousarray(self._templates[sample]))
        for start in range(0, live.size, 100_000):
            part = live[start : start + 100_000]
            ivf.add_with_ids(np.ascontiguousarray(self._templates[part]), part)
        ivf.nprobe = self.nprobe
        self._faiss_index, self.kind = ivf, "ivf"
        self._quantizer = quantizer  # keep the Python object alive alongside the index

    def set_nprobe(self, nprobe: int) -> None:
        if nprobe <= 0:
            raise GalleryIndexError(f"nprobe must be positive, got {nprobe}")
        self.nprobe = int(nprobe)
        if self.kind == "ivf":
            self._faiss_index.nprobe = self.nprobe

    # ------------------------------------------------------------------------------------------- search

    def search_rows(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(slots, scores)`` per query, ``-1`` / ``-inf`` where fewer identities exist."""
        if k <= 0:
            raise GalleryIndexError(f"k must be positive, got {k}")
        queries = unit_queries(queries, self.dim)
        width = min(k, len(self))
        if self._faiss_index is None or width == 0:
            size = len(self._names)
            rows, scores = exact_top_k(queries, self._templates[:size], width, valid=self._counts[:size] > 0)
            return rows, scores
        scores, rows = self._faiss_index.search(np.ascontiguousarray(queries), width)
        scores = scores.astype(np.float64)
        scores[rows < 0] = -np.inf
        return rows.astype(np.int64), scores

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """Top-``k`` identities (cosine similarity, best first) for each query embedding (normalised here)."""
        rows, scores = self.search_rows(queries, k)
        return [
            [SearchHit(self._names[r], float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
            for row, score in zip(rows, scores, strict=True)
        ]

    # ----------------------------------------------------------------------------------------- model check

    def check_compatible(self, fingerprint: str, output_dim: int | None = None) -> None:
        """Refuse a query model other than the one the index was enrolled with."""
        check_compatible(self.metadata, self.dim, fingerprint, output_dim)

    # -------------------------------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically as a pickle-free ``.npz``."""
        size = len(self._names)
        if not (np.isfinite(self._templates[:size]).all() and np.isfinite(self._sum_norms[:size]).all()):
            raise GalleryIndexError(f"refusing to write {path}: the index holds NaN or infinite templates")
        settings = {
            "approximate_above": self.approximate_above,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "kind": self.kind,
        }
        metadata = {**self.metadata, "format": GALLERY_INDEX_FORMAT, "dim": self.dim, "index": settings}
        digest_slots, digest_rows = self._digest_table()
        arrays = dict(
            metadata=np.asarray(json.dumps(metadata)),
            names=np.asarray(self._names if size else [""], dtype=str)[:size],
            templates=self._templates[:size],
            sum_norms=self._sum_norms[:size],
            counts=self._counts[:size],
            image_digests=digest_rows,
            image_digest_slots=digest_slots,
        )
        if self.kind == "ivf":
            arrays["faiss_ivf"] = _faiss().serialize_index(self._faiss_index)
        path = Path(path)
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as stream:  # a file object keeps numpy from appending ".npz"
                np.savez(stream, **arrays)
        return path

    def _digest_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole image record as ``(slots, digests)``, sorted by slot, live identities only."""
        live = np.array([bool(name) for name in self._names], dtype=bool)
        keep = live[self._digest_slots] if self._digest_slots.size else np.zeros((0,), bool)
        slots, rows = [self._digest_slots[keep]], [self._digest_rows[keep]]
        for slot, digests in self._digests_added.items():
            slots.append(np.full(len(digests), slot, np.int64))
            rows.append(np.frombuffer(b"".join(digests), np.uint8).reshape(-1, DIGEST_SIZE))
        slots, rows = np.concatenate(slots), np.concatenate(rows)
        order = np.argsort(slots, kind="stable")
        return slots[order], rows[order]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backend: str = "auto",
        nprobe: int | None = None,
        approximate_above: int | None = None,
    ) -> GalleryIndex:
        """Read an index written by :meth:`save` (or a v1 ``FaceIndex`` file). Never unpickles."""
        path = Path(path)
        if not path.is_file():
            raise GalleryIndexError(f"index file {path} does not exist")
        try:  # members are read (and CRC-checked) here, so a damaged file fails now, with its name
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
            raise GalleryIndexError(f"index file {path} is not a plain kprpe index ({exc})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise GalleryIndexError(
                f"index file {path} is not a readable .npz (truncated or damaged: {exc})"
            ) from None
        try:
            metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise GalleryIndexError(f"index file {path}: metadata is not JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise GalleryIndexError(f"index file {path} has no metadata object; not a kprpe index")
        fingerprint = metadata.get("model_fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise GalleryIndexError(
                f"index file {path}: model_fingerprint must be text, got {type(fingerprint).__name__}"
            )
        if metadata.get("format") == LEGACY_INDEX_FORMAT:
            try:
                return cls._from_legacy(
                    path,
                    arrays,
                    metadata,
                    backend=backend,
                    nprobe=nprobe,
                    approximate_above=approximate_above,
                )
            except (KeyError, ValueError, TypeError) as exc:
                if isinstance(exc, GalleryIndexError):
                    raise
                raise GalleryIndexError(f"index file {path}: not a usable v1 index ({exc})") from None
        if metadata.get("format") != GALLERY_INDEX_FORMAT:
            raise GalleryIndexError(
                f"index file {path}: unknown format {metadata.get('format')!r} "
                f"(expected {GALLERY_INDEX_FORMAT})"
            )
        missing = [k for k in ("names", "templates", "sum_norms", "counts") if k not in arrays]
        if missing:
            raise GalleryIndexError(f"index file {path} lacks arrays {missing}")
        templates, sum_norms, counts = arrays["templates"], arrays["sum_norms"], arrays["counts"]
        kinds = {"names": "U", "templates": "f", "sum_norms": "f", "counts": "iu"}
        for key, kind in kinds.items():
            if arrays[key].dtype.kind not in kind:
                raise GalleryIndexError(
                    f"index file {path}: {key} are {arrays[key].dtype} values, expected "
                    f"{'text' if kind == 'U' else 'numbers'}"
                )
        names = [str(n) for n in arrays["names"].reshape(-1).tolist()]
        size = len(names)
        if (
            templates.ndim != 2
            or templates.shape[0] != size
            or sum_norms.shape != (size,)
            or counts.shape != (size,)
        ):
            raise GalleryIndexError(
                f"index file {path}: array shapes disagree (names {size}, templates "
                f"{templates.shape}, sum_norms {sum_norms.shape}, counts {counts.shape})"
            )
        live = [n for n in names if n]
        if len(set(live)) != len(live):
            raise GalleryIndexError(f"index file {path}: identity names repeat")
        _check_templates(path, names, templates, sum_norms, counts)
        settings = _index_settings(path, metadata.pop("index", None))
        for key in ("format", "dim"):
            metadata.pop(key, None)
        index = cls(
            int(templates.shape[1]),
            metadata=metadata,
            backend=backend,
            approximate_above=settings.get("approximate_above")
            if approximate_above is None
            else approximate_above,
            nlist=settings.get("nlist"),
            nprobe=nprobe if nprobe is not None else settings.get("nprobe") or DEFAULT_NPROBE,
        )
        index._names = names
        index._slot = {n: i for i, n in enumerate(names) if n}
        index._templates = np.ascontiguousarray(templates, dtype=np.float32)
        index._sum_norms = sum_norms.astype(np.float64)
        index._counts = counts.astype(np.int64)
        index._counts[[i for i, n in enumerate(names) if not n]] = 0
        index._digest_slots, index._digest_rows = _image_record(path, arrays, names, index._counts)
        if index.backend == "faiss":
            if "faiss_ivf" in arrays:
                faiss = _faiss()
                try:
                    ivf = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_ivf"], dtype=np.uint8))
                except RuntimeError as exc:
                    raise GalleryIndexError(
                        f"index file {path}: the FAISS part cannot be read ({exc})"
                    ) from None
                if ivf.ntotal != len(index) or ivf.d != index.dim:
                    raise GalleryIndexError(
                        f"index file {path}: the FAISS part holds {ivf.ntotal} x {ivf.d}, "
                        f"expected {len(index)} x {index.dim}"
                    )
                ivf.nprobe = index.nprobe
                index._faiss_index, index.kind = ivf, "ivf"
            else:
                live_slots = np.nonzero(index._counts > 0)[0].astype(np.int64)
                index._faiss_index.add_with_ids(
                    np.ascontiguousarray(index._templates[live_slots]), live_slots
                )
                if index.approximate_above and len(index) >= index.approximate_above:
                    index.build_approximate()
        return index

    @classmethod
    def _from_legacy(cls, path: Path, arrays: dict, metadata: dict, **options) -> GalleryIndex:
        """A v1 index file (the old ``FaceIndex``): its templates are kept; pooled sums are taken as ``count``
        long (exact for identical images, close otherwise), so adding images later weighs old and new images
        alike."""
        missing = [k for k in ("identities", "embeddings", "counts") if k not in arrays]
        if missing:
            raise GalleryIndexError(f"index file {path} lacks arrays {missing}")
        identities, embeddings, counts = arrays["identities"], arrays["embeddings"], arrays["counts"]
        if identities.dtype.kind != "U" or embeddings.dtype.kind != "f":
            raise GalleryIndexError(
                f"index file {path}: identities must be strings and embeddings floats, got "
                f"{identities.dtype} and {embeddings.dtype}"
            )
        names = [str(x) for x in identities.tolist()]
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names) or counts.shape != (len(names),):
            raise GalleryIndexError(
                f"index file {path}: embeddings {embeddings.shape} and counts {counts.shape} do not match "
                f"{len(names)} identities"
            )
        if len(set(names)) != len(names):
            raise GalleryIndexError(f"index file {path}: identity names repeat")
        meta = {k: v for k, v in metadata.items() if k != "format"}
        backend = options.get("backend") or "auto"
        index = cls(
            int(embeddings.shape[1]) or 1,
            metadata=meta,
            backend=backend,
            approximate_above=options.get("approximate_above") or DEFAULT_APPROXIMATE_ABOVE,
            nprobe=options["nprobe"] if options.get("nprobe") is not None else DEFAULT_NPROBE,
        )
        for name, template, count in zip(names, embeddings, counts, strict=True):
            index.add({str(name): np.repeat(template[None].astype(np.float64), max(int(count), 1), axis=0)})
        return index


def _check_templates(path, names: list[str], templates, sum_norms, counts) -> None:
    """Live identities (non-empty names) need a finite unit template, a finite positive pooled-sum norm and at
    least one image: a rescaled or NaN template gives wrong scores, or NaN ones after ``enrol --append``."""
    live = np.array([bool(n) for n in names], dtype=bool)
    if not np.isfinite(templates).all():
        raise GalleryIndexError(f"index file {path}: templates contain NaN or infinity")
    if not np.isfinite(sum_norms).all() or (sum_norms[live] <= 0).any():
        raise GalleryIndexError(
            f"index file {path}: sum_norms must be finite and positive for every identity"
        )
    if (counts < 0).any() or (counts[live] < 1).any():
        raise GalleryIndexError(f"index file {path}: every identity needs an image count of at least 1")
    norms = np.linalg.norm(templates[live].astype(np.float64), axis=1)
    off = np.nonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)[0]
    if off.size:
        name = [n for n in names if n][int(off[0])]
        raise GalleryIndexError(
            f"index file {path}: the template of {name!r} has norm {norms[off[0]]:.6g}, not 1; templates are "
            "unit vectors (the file was modified)"
        )


def _image_record(path, arrays: dict, names: list[str], counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The file's image record, checked; an index written before there was one has none (its images are
    unknown: pooled, but not recorded)."""
    if "image_digests" not in arrays and "image_digest_slots" not in arrays:
        return np.zeros((0,), np.int64), np.zeros((0, DIGEST_SIZE), np.uint8)
    rows, slots = arrays.get("image_digests"), arrays.get("image_digest_slots")
    if rows is None or slots is None:
        raise GalleryIndexError(f"index file {path}: image_digests and image_digest_slots come together")
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != DIGEST_SIZE:
        raise GalleryIndexError(
            f"index file {path}: image_digests must be (M, {DIGEST_SIZE}) uint8, got "
            f"{rows.shape} {rows.dtype}"
        )
    if slots.dtype.kind not in "iu" or slots.shape != (rows.shape[0],):
        raise GalleryIndexError(
            f"index file {path}: image_digest_slots must be {rows.shape[0]} whole numbers, got "
            f"{slots.shape} {slots.dtype}"
        )
    slots = slots.astype(np.int64)
    live = np.array([bool(n) for n in names], dtype=bool)
    if slots.size and ((slots < 0).any() or (slots >= len(names)).any() or not live[slots].all()):
        raise GalleryIndexError(f"index file {path}: image_digest_slots name identities that are not in it")
    if (np.bincount(slots, minlength=len(names)) > counts).any():  # more images recorded than pooled
        raise GalleryIndexError(f"index file {path}: an identity records more images than its image count")
    order = np.argsort(slots, kind="stable")  # already sorted when kprpe wrote it
    return slots[order], np.ascontiguousarray(rows[order])


def _index_settings(path, settings) -> dict:
    """The ``index`` part of the metadata, each value of the kind :class:`GalleryIndex` takes."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise GalleryIndexError(
            f"index file {path}: metadata 'index' must be an object, got {settings!r:.60}"
        )
    for key, low in (("approximate_above", 0), ("nlist", 1), ("nprobe", 1)):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise GalleryIndexError(
                f"index file {path}: index setting {key} must be a whole number >= {low}, got {value!r:.60}"
            )
    if settings.get("kind", "exact") not in ("exact", "ivf"):
        raise GalleryIndexError(
            f"index file {path}: index kind must be 'exact' or 'ivf', got {settings['kind']!r}"
        )
    return settings


@dataclass
class EnrolReport:
    """What :func:`enrol_gallery_report` did: ``failures`` (image or identity, reason); ``pooled``: images
    pooled per identity; ``already_pooled``: images skipped, unembedded, because their content is already
    in that identity's record (pooled before, or a copy earlier in this folder); ``unrecorded``: identities
    of the folder already in the gallery with images pooled without a record, and how many (those cannot be
    recognised, so a copy of one would be pooled again)."""

    failures: list[tuple[str, str]] = field(default_factory=list)
    pooled: dict[str, int] = field(default_factory=dict)
    already_pooled: int = 0
    unrecorded: dict[str, int] = field(default_factory=dict)


def enrol_gallery(
    index: GalleryIndex,
    gallery: str | os.PathLike,
    *,
    pipeline,
    embedder,
    progress: bool = True,
    workers: int | None = 0,
    pipeline_factory=None,
) -> list[tuple[str, str]]:
    """Embed ``GALLERY/<identity>/<images>`` (largest face each) and pool them into ``index`` (new identities
    are created, existing ones grow; an image already in an identity's record is skipped). Returns the images
    and identities that failed, with reasons; :func:`enrol_gallery_report` says what was pooled and skipped.
    """
    return enrol_gallery_report(
        index,
        gallery,
        pipeline=pipeline,
        embedder=embedder,
        progress=progress,
        workers=workers,
        pipeline_factory=pipeline_factory,
    ).failures


def enrol_gallery_report(
    index: GalleryIndex,
    gallery: str | os.PathLike,
    *,
    pipeline,
    embedder,
    progress: bool = True,
    workers: int | None = 0,
    pipeline_factory=None,
    records: Callable[[list[str]], Mapping[str, tuple[frozenset[bytes], int]]] | None = None,
) -> EnrolReport:
    """Embed ``GALLERY/<identity>/<images>`` (largest face each) and pool them into ``index`` with their
    :func:`image_digest`, skipping, before they are embedded, the images whose content an identity has
    already pooled. ``records``: where those records are read (default ``index.image_records``; a database
    gallery staged in a fresh ``index`` passes its own).

    Streams (:mod:`kprpe.streaming.stream`): crops are embedded a batch at a time and pooled as they come, so
    memory does not grow with the gallery. ``workers``/``pipeline_factory``: detection in worker processes.
    ``pipeline``: what :func:`~kprpe.streaming.stream.stream_embeddings` takes; one that keeps every face
    (``all_faces``) is asked for its largest-face-only copy (``largest_only()``).
    """
    from ..streaming.stream import stream_embeddings

    report = EnrolReport()
    per_identity_paths = gallery_images(gallery)
    stored = (records or index.image_records)(list(per_identity_paths))
    report.unrecorded = {
        name: count - len(digests) for name, (digests, count) in stored.items() if count > len(digests)
    }
    identity_of: dict[str, str] = {}
    digest_of: dict[str, bytes] = {}
    paths: list[Path] = []
    known: set[str] = set()  # identities with an image already pooled: in the gallery, never "dropped"
    for name, images in per_identity_paths.items():
        seen = set(stored[name][0]) if name in stored else set()
        for path in images:  # hashed before anything is embedded: a skipped image costs one read
            try:
                digest = image_digest(path)
            except OSError as exc:
                report.failures.append((str(path), f"cannot read the file ({exc.strerror or exc})"))
                continue
            if digest in seen:
                report.already_pooled += 1
                known.add(name)
                continue
            seen.add(digest)
            identity_of[str(path)], digest_of[str(path)] = name, digest
            paths.append(path)
    single = pipeline.largest_only() if getattr(pipeline, "all_faces", False) else pipeline
    names: list[str] = []
    vectors: list[np.ndarray] = []
    digests: list[bytes] = []

    def pool() -> None:
        if names:
            index.add_embeddings(names, np.stack(vectors), digests=digests)
            for name in names:
                report.pooled[name] = report.pooled.get(name, 0) + 1
            names.clear()
            vectors.clear()
            digests.clear()

    if paths:
        for done in stream_embeddings(
            paths,
            pipeline=single,
            embedder=embedder,
            workers=workers,
            pipeline_factory=pipeline_factory,
            progress=progress,
            paths=paths,
        ):
            if done.failure is not None:
                report.failures.append((done.task.path, done.failure))
            for row in done.rows:
                if row.face_index == 0:  # the largest face (a factory-built pipeline may keep them all)
                    names.append(identity_of[done.task.path])
                    vectors.append(row.embedding)
                    digests.append(digest_of[done.task.path])
            if len(names) >= embedder.batch_size:
                pool()
        pool()
    for name in per_identity_paths:
        if name not in known and name not in report.pooled:
            report.failures.append(
                (str(Path(gallery) / name), "identity dropped: no usable face in any of its images")
            )
    return report
