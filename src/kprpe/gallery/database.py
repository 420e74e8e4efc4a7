"""The gallery in a vector database: the same operations and answers as :class:`~.index.GalleryIndex`
(enrol, grow, remove, top-k cosine search over IJB-style templates, the fingerprint check), stored in Milvus
or Qdrant instead of a local ``.npz`` file.

A gallery is named by a URI (:func:`parse_gallery_uri`):

- ``milvus:///abs/path/gallery.db`` / ``milvus://relative.db``: Milvus Lite, embedded in this process;
- ``http://host:19530`` (or ``milvus+http://``): a Milvus server or cluster, shared by many processes
  (``milvus-lite server --data-dir D --port P`` runs one on this machine);
- ``qdrant:///abs/path/folder``: Qdrant's local mode, embedded; ``qdrant+http://host:6333``: a Qdrant server;
- anything else is a file path: today's FAISS/NumPy ``.npz`` index (:func:`open_gallery` loads it).

Qdrant's local mode keeps its points as pickles and unpickles them on open: a Qdrant folder must be one you
wrote (a database is storage you run; exchange galleries as ``.npz`` index files). Milvus Lite stores no
pickles.

An embedded gallery is locked by the process that opens it (both engines refuse a second process); to share
one gallery between processes (several ``kprpe serve``), use a server URI.

Each identity is one row: a 63-bit id derived from its name (:func:`identity_id`, so writes are idempotent),
the name, the unit template (float32), the norm of the pooled sum of its unit embeddings, its image count and
its image record (the SHA-256 of each image pooled, base64 text: what lets ``enrol --append`` skip an image
already pooled); the row is written whole, so an identity is never half-written. A Milvus row's record is a
``VARCHAR`` of at most 65,535 bytes, :data:`MILVUS_MAX_DIGESTS` images; a Milvus gallery created before the
record existed has no such field (Milvus cannot add one to a collection) and pools without a record. The
gallery's metadata (model fingerprint, crop settings) is one row of a second collection,
``<collection>_meta``. Searches go to the database every time, so a process sees other processes'
enrolments at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .index import DIGEST_SIZE, GalleryIndex
from .search import GalleryIndexError, SearchHit, check_compatible, unit_queries

__all__ = [
    "DATABASE_ENGINES",
    "DEFAULT_COLLECTION",
    "DatabaseGallery",
    "MILVUS_MAX_DIGESTS",
    "identity_id",
    "is_database_uri",
    "open_gallery",
    "parse_gallery_uri",
]

DATABASE_ENGINES = ("milvus", "qdrant")
DEFAULT_COLLECTION = "kprpe_gallery"
WRITE_ROWS = 2048  # rows per upsert: 2048 x 512 float32 = 4 MiB, far below Milvus's 64 MiB gRPC message limit
# Milvus: rows written since the last flush are searched unindexed; seal them after this many (see commit)
FLUSH_ROWS = 16384
SEAL_ROWS = 1024
# Milvus caps a VARCHAR at 65,535 bytes: base64 of 1,535 SHA-256 digests is 65,496 characters, of 1,536 65,536
MILVUS_DIGESTS_LENGTH = 65535
MILVUS_MAX_DIGESTS = 1535
_HINT = {
    "milvus": "install the optional extra: pip install 'kprpe[db]' (pymilvus, milvus-lite)",
    "qdrant": "install the optional extra: pip install 'kprpe[db]' (qdrant-client)",
}


def parse_gallery_uri(uri: str | os.PathLike) -> tuple[str, str] | None:
    """``(engine, target)`` for a database URI, ``None`` for a plain file path (a FAISS/NumPy index)."""
    text = os.fspath(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return None
    scheme = scheme.lower()
    if scheme in ("http", "https", "milvus+http", "milvus+https"):
        return "milvus", f"{scheme.removeprefix('milvus+')}://{rest}"
    if scheme in ("qdrant+http", "qdrant+https"):
        return "qdrant", f"{scheme.removeprefix('qdrant+')}://{rest}"
    if scheme in DATABASE_ENGINES:
        if not rest:
            raise GalleryIndexError(f"gallery URI {text!r} names no path (e.g. {scheme}:///data/gallery.db)")
        return scheme, rest
    raise GalleryIndexError(
        f"gallery URI {text!r}: unknown scheme {scheme!r}; use a file path (FAISS), milvus:///PATH.db, "
        "http://HOST:19530 (Milvus server), qdrant:///FOLDER or qdrant+http://HOST:6333"
    )


def is_database_uri(uri: str | os.PathLike | None) -> bool:
    return uri is not None and parse_gallery_uri(uri) is not None


def identity_id(name: str) -> int:
    """A stable 63-bit id for an identity name (BLAKE2b): the same name is the same row in every process, so
    re-running an enrolment overwrites rows instead of duplicating them. Collisions (about 3e-8 at 1M names)
    are detected on write and refused."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise GalleryIndexError(
            f"identity names must be non-empty strings without NUL characters, got {name!r}"
        )
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _pack_digests(digests: Iterable[bytes]) -> str:
    """An identity's image record as one text value (sorted: the same record is the same text)."""
    return base64.b64encode(b"".join(sorted(digests))).decode("ascii")


def _unpack_digests(text, name) -> list[bytes]:
    if text is None:  # a row written before there was a record: its images are unknown
        return []
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) % DIGEST_SIZE:
        raise GalleryIndexError(f"identity {name!r}: its image record is not base64 SHA-256 digests")
    return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def open_gallery(uri: str | os.PathLike, **options):
    """A gallery by URI: :class:`DatabaseGallery` for a database URI, else ``GalleryIndex.load(path)``
    (``options``: ``backend``, ``nprobe`` for files; ``collection`` for databases)."""
    if is_database_uri(uri):
        return DatabaseGallery.open(uri, collection=options.get("collection") or DEFAULT_COLLECTION)
    options.pop("collection", None)
    return GalleryIndex.load(uri, **options)


class DatabaseGallery:
    """Identity templates in Milvus or Qdrant; the interface of :class:`GalleryIndex` (no ``save`` needed:
    every change is written when it is made)."""

    def __init__(self, store, uri: str, dim: int, metadata: dict) -> None:
        self._store = store
        self.uri = uri
        self.dim = int(dim)
        self.metadata = dict(metadata)
        self.backend = store.engine
        self.kind = "database"
        # False for a Milvus gallery created before identities recorded their images: it pools without one
        self.records_images = bool(store.records_images)

    @classmethod
    def open(
        cls,
        uri: str | os.PathLike,
        *,
        dim: int | None = None,
        metadata: dict | None = None,
        collection: str = DEFAULT_COLLECTION,
    ) -> DatabaseGallery:
        """Open the gallery at ``uri``; with ``dim`` (and ``metadata``) create it when it does not exist. An
        existing gallery keeps its metadata; ``metadata``'s fingerprint must match it."""
        parsed = parse_gallery_uri(uri)
        if parsed is None:
            raise GalleryIndexError(f"{os.fspath(uri)!r} is a file path, not a database URI")
        engine, target = parsed
        local = not target.startswith(("http://", "https://"))
        if dim is None and local and not Path(target).expanduser().exists():  # a query creates no files
            raise GalleryIndexError(
                f"gallery {os.fspath(uri)} does not exist; enrol one first "
                "('kprpe search enrol GALLERY --gallery URI')"
            )
        store = _Guarded(_STORES[engine](target, collection), os.fspath(uri))
        stored = store.read_meta()
        if stored is None:
            if dim is None:
                store.close()
                raise GalleryIndexError(
                    f"gallery {os.fspath(uri)} holds no kprpe gallery (collection {collection!r}); "
                    "enrol one first ('kprpe search enrol GALLERY --gallery URI')"
                )
            if dim <= 0:
                raise GalleryIndexError(f"embedding dimension must be positive, got {dim}")
            stored = {**(metadata or {}), "dim": int(dim)}
            store.create(int(dim), json.dumps(stored))
        gallery = cls(store, os.fspath(uri), stored.pop("dim"), stored)
        if metadata and metadata.get("model_fingerprint"):
            gallery.check_compatible(metadata["model_fingerprint"], dim)
        return gallery

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> DatabaseGallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return self._store.count()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(name) and name in self._rows([name])

    @property
    def names(self) -> list[str]:
        return sorted(self._store.names())

    def count(self, name: str) -> int:
        return int(self._row(name)[3])

    def template(self, name: str) -> np.ndarray:
        return np.asarray(self._row(name)[1], np.float32)

    def describe(self) -> dict:
        return {"backend": self.backend, "kind": self.kind, "uri": self.uri, "identities": len(self)}

    def check_compatible(self, fingerprint: str, output_dim: int | None = None) -> None:
        check_compatible(self.metadata, self.dim, fingerprint, output_dim)

    def save(self, path=None) -> None:
        """Nothing to do: every change was written when it was made (kept so callers treat files and
        databases alike)."""

    def image_records(self, names: Iterable[str]) -> dict[str, tuple[frozenset[bytes], int]]:
        """``{name: (digests of the images recorded as pooled, image count)}`` for the names stored (others
        left out). ``count - len(digests)`` images were pooled without a record."""
        names, found = list(names), {}
        for start in range(0, len(names), WRITE_ROWS):  # a folder of 100k identities: bounded requests
            for name, row in self._rows(names[start : start + WRITE_ROWS]).items():
                found[name] = (frozenset(_unpack_digests(row[4], name)), int(row[3]))
        return found

    def _rows(self, names: Iterable[str]) -> dict[str, tuple]:
        """``{name: (name, template, sum_norm, count, digests text or None)}`` for the names stored (absent
        ones left out)."""
        names = list(names)
        ids = [identity_id(name) for name in names]
        found = self._store.get(ids)
        rows = {}
        for name, row_id in zip(names, ids, strict=True):
            row = found.get(row_id)
            if row is None:
                continue
            if row[0] != name:
                raise GalleryIndexError(f"identity {name!r} collides with {row[0]!r} (same 63-bit id)")
            rows[name] = row
        return rows

    def _row(self, name: str) -> tuple:
        row = self._rows([name]).get(name)
        if row is None:
            raise GalleryIndexError(f"identity {name!r} is not in the gallery")
        return row

    # ---------------------------------------------------------------------------------------- add/remove

    def add(self, per_identity: Mapping[str, np.ndarray]) -> None:
        """Pool unit embeddings ``{name: (n, D)}`` into the templates (new names become new identities)."""
        staging = GalleryIndex(self.dim, backend="numpy", approximate_above=0)
        staging.add(per_identity)  # checks shapes, NaN and zero rows before anything is written
        self.write(staging, pool=True)

    def add_embeddings(self, names, embeddings: np.ndarray) -> None:
        """Pool row ``i`` of ``embeddings`` into identity ``names[i]`` (names may repeat)."""
        staging = GalleryIndex(self.dim, backend="numpy", approximate_above=0)
        staging.add_embeddings(names, embeddings)
        self.write(staging, pool=True)

    def write(self, staging: GalleryIndex, *, pool: bool) -> None:
        """Write every identity of ``staging`` (an in-memory index built by :func:`~.index.enrol_gallery`).

        ``pool=False`` sets each identity to ``staging``'s template and image record (idempotent: writing the
        same staging again gives the same gallery, which is how an interrupted enrolment is finished: run it
        again); ``pool=True`` adds ``staging``'s images to what the gallery already holds for that identity,
        and their digests to its record (an image already recorded there is refused: it would count twice).
        Rows go in batches of :data:`WRITE_ROWS`; each identity's row, record included, is written whole.
        """
        if staging.dim != self.dim:
            raise GalleryIndexError(f"templates are {staging.dim}-d but the gallery holds {self.dim}-d ones")
        names = staging.names
        for start in range(0, len(names), WRITE_ROWS):
            part = names[start : start + WRITE_ROWS]
            templates, sum_norms, counts = staging.pooled_rows(part)
            records = {name: set(digests) for name, (digests, _) in staging.image_records(part).items()}
            stored = self._rows(part)  # also refuses an id collision before anything is written
            if pool:
                for i, name in enumerate(part):
                    if name in stored:
                        _, template, sum_norm, count, text = stored[name]
                        before = _unpack_digests(text, name)
                        if records[name].intersection(before):
                            raise GalleryIndexError(
                                f"identity {name!r}: an image of this enrolment is already pooled into it"
                            )
                        records[name].update(before)
                        pooled = templates[i] * sum_norms[i] + np.asarray(template, np.float64) * sum_norm
                        sum_norms[i] = np.linalg.norm(pooled)
                        if not np.isfinite(sum_norms[i]) or sum_norms[i] < 1e-12:
                            raise GalleryIndexError(f"identity {name!r}: pooled embeddings sum to zero")
                        templates[i] = pooled / sum_norms[i]
                        counts[i] += int(count)
            texts = [_pack_digests(records[name]) for name in part]
            if self._store.engine == "milvus" and self.records_images:
                for name, text in zip(part, texts, strict=True):
                    if len(text) > MILVUS_DIGESTS_LENGTH:  # refused before this batch is written
                        raise GalleryIndexError(
                            f"identity {name!r}: {len(records[name])} images; a Milvus gallery records at "
                            f"most {MILVUS_MAX_DIGESTS} per identity (its 64 KiB text field); keep "
                            "identities this large in a Qdrant gallery or an .npz index"
                        )
            self._store.upsert(
                [identity_id(name) for name in part],
                part,
                templates.astype(np.float32),
                sum_norms,
                counts,
                texts if self.records_images else None,
            )
        self._store.commit()

    def remove(self, names: Iterable[str]) -> list[str]:
        """Drop identities (unknown names are an error, checked before anything changes)."""
        names = list(dict.fromkeys(names))
        stored = self._rows(names)
        unknown = [name for name in names if name not in stored]
        if unknown:
            raise GalleryIndexError(f"cannot remove identities that are not in the gallery: {unknown[:5]}")
        self._store.delete([identity_id(name) for name in names])
        return names

    def clear(self) -> None:
        """Drop every identity and the metadata (``kprpe search enrol --overwrite``)."""
        self._store.drop()

    # -------------------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """Top-``k`` identities (cosine similarity, best first) for each query embedding (normalised here)."""
        if k <= 0:
            raise GalleryIndexError(f"k must be positive, got {k}")
        unit = unit_queries(queries, self.dim)
        found = self._store.search(unit, k)
        return [[SearchHit(name, float(score)) for name, score in hits] for hits in found]


# ------------------------------------------------------------------------------------------------ engines


class _Guarded:
    """A store whose calls turn the database's own failures (a server gone, a refused request: pymilvus,
    gRPC and qdrant-client each raise their own types) into one-line :class:`GalleryIndexError`s naming the
    gallery."""

    def __init__(self, store, uri: str) -> None:
        self._store, self._uri = store, uri
        self.engine = store.engine

    @property
    def records_images(self) -> bool:
        return self._store.records_images

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def guarded(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except GalleryIndexError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database's error types are its own
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GalleryIndexError(
                    f"gallery {self._uri}: {self.engine} failed in {name}: {first}"
                ) from None

        return guarded


def _decoded(found_meta) -> dict | None:
    if found_meta is None:
        return None
    try:
        meta = json.loads(found_meta)
    except json.JSONDecodeError as exc:
        raise GalleryIndexError(f"the gallery's metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
        raise GalleryIndexError("the gallery's metadata is not a kprpe gallery's (no dimension)")
    return meta


class _MilvusStore:
    """pymilvus ``MilvusClient``: Milvus Lite for a ``.db`` path, a server for ``http(s)://``. Exact search
    (``FLAT`` index, inner product) with strong consistency, so a write is visible to the next search."""

    engine = "milvus"

    def __init__(self, target: str, collection: str) -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise GalleryIndexError(f"a Milvus gallery needs pymilvus; {_HINT['milvus']}") from None
        local = not target.startswith(("http://", "https://"))
        if local:
            Path(target).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(target)
        except Exception as exc:  # pymilvus raises several unrelated types for "cannot connect"
            why = "another process has it open? share a gallery through a server URI" if local else str(exc)
            raise GalleryIndexError(f"cannot open Milvus gallery {target} ({why})") from None
        self._name, self._meta = collection, f"{collection}_meta"
        self._unflushed = 0
        self.records_images = True

    def read_meta(self) -> dict | None:
        if not self._client.has_collection(self._meta):
            return None
        self._client.load_collection(self._meta)
        self._client.load_collection(self._name)
        fields = self._client.describe_collection(self._name)["fields"]
        self.records_images = any(f["name"] == "digests" for f in fields)
        rows = self._client.get(self._meta, ids=[0], output_fields=["meta"])
        return _decoded(rows[0]["meta"] if rows else None)

    def create(self, dim: int, meta: str) -> None:
        from pymilvus import DataType

        client = self._client
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("name", DataType.VARCHAR, max_length=4096)
        schema.add_field("template", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("sum_norm", DataType.DOUBLE)
        schema.add_field("count", DataType.INT64)
        schema.add_field("digests", DataType.VARCHAR, max_length=MILVUS_DIGESTS_LENGTH)
        self.records_images = True
        params = client.prepare_index_params()
        params.add_index("template", index_type="FLAT", metric_type="IP")
        client.create_collection(self._name, schema=schema, index_params=params, consistency_level="Strong")
        meta_schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        meta_schema.add_field("id", DataType.INT64, is_primary=True)
        meta_schema.add_field("meta", DataType.VARCHAR, max_length=65535)
        meta_schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        meta_params = client.prepare_index_params()
        meta_params.add_index("unused", index_type="FLAT", metric_type="L2")
        # the metadata row last: a gallery whose creation was interrupted reads as absent and is created again
        client.create_collection(
            self._meta, schema=meta_schema, index_params=meta_params, consistency_level="Strong"
        )
        client.upsert(self._meta, [{"id": 0, "meta": meta, "unused": [0.0, 0.0]}])

    def get(self, ids: list[int]) -> dict[int, tuple]:
        if not ids:
            return {}
        fields = ["name", "template", "sum_norm", "count"] + (["digests"] if self.records_images else [])
        rows = self._client.get(self._name, ids=ids, output_fields=fields)
        return {
            r["id"]: (r["name"], r["template"], float(r["sum_norm"]), int(r["count"]), r.get("digests"))
            for r in rows
        }

    def upsert(self, ids, names, templates, sum_norms, counts, digests) -> None:
        rows = [
            {"id": i, "name": n, "template": t, "sum_norm": float(s), "count": int(c)}
            for i, n, t, s, c in zip(ids, names, templates, sum_norms, counts, strict=True)
        ]
        if digests is not None:
            for row, text in zip(rows, digests, strict=True):
                row["digests"] = text
        self._client.upsert(self._name, rows)
        self._unflushed += len(rows)
        if self._unflushed >= FLUSH_ROWS:
            self.commit()

    def commit(self) -> None:
        """Seal what was written into an indexed segment: Milvus Lite searches rows still in its growing
        segment far slower (1.7 s per query over 5,000 unsealed rows, 25-40 ms once sealed, on this
        project's loaded 2-core machine). Rows are durable before this (a killed writer loses none)."""
        if self._unflushed >= SEAL_ROWS:
            self._client.flush(self._name)
        self._unflushed = 0

    def delete(self, ids: list[int]) -> None:
        self._client.delete(self._name, ids=ids)

    def count(self) -> int:
        rows = self._client.query(self._name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def names(self) -> list[str]:
        if self.count() <= 16384:  # one query answers up to Milvus's 16384-row limit
            rows = self._client.query(self._name, filter="", output_fields=["name"], limit=16384)
            return [row["name"] for row in rows]
        iterator = self._client.query_iterator(self._name, batch_size=4096, filter="", output_fields=["name"])
        found = []
        while batch := iterator.next():
            found.extend(row["name"] for row in batch)
        iterator.close()
        return found

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        results = self._client.search(self._name, data=list(queries), limit=k, output_fields=["name"])
        return [[(hit["entity"]["name"], hit["distance"]) for hit in hits] for hits in results]

    def drop(self) -> None:
        for name in (self._meta, self._name):
            self._client.drop_collection(name)

    def close(self) -> None:
        self._client.close()


class _QdrantStore:
    """qdrant-client: local mode for a folder (embedded, exact search in NumPy), a server for
    ``http(s)://``. Dot-product distance over unit templates = cosine."""

    engine = "qdrant"

    def __init__(self, target: str, collection: str) -> None:
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            raise GalleryIndexError(f"a Qdrant gallery needs qdrant-client; {_HINT['qdrant']}") from None
        self._models = models
        self._remote = target.startswith(("http://", "https://"))
        try:
            # qdrant-client's own server-version check runs in a background thread and warns whenever it
            # ends: for a server that is not there, after open's one-line error, on whatever runs next. The
            # version is checked in read_meta instead, in the caller's thread (_check_server_version).
            if self._remote:
                self._client = QdrantClient(url=target, check_compatibility=False)
            else:
                self._client = QdrantClient(path=target)
        except RuntimeError as exc:  # local mode: "already accessed by another instance"
            raise GalleryIndexError(
                f"cannot open Qdrant gallery {target} ({exc}); share a gallery through a server URI"
            ) from None
        self._target = target
        self._name, self._meta = collection, f"{collection}_meta"
        self.records_images = True  # a payload takes any key: an older row simply has no record

    def _check_server_version(self) -> None:
        """Warn, as qdrant-client would, when the server's major version differs from the client's or their
        minor versions are more than one apart. An unreachable server raises here (one line, via _Guarded)."""
        import importlib.metadata
        import warnings

        server = str(self._client.info().version)
        client = importlib.metadata.version("qdrant-client")
        try:
            s_major, s_minor = map(int, server.split(".")[:2])
            c_major, c_minor = map(int, client.split(".")[:2])
            compatible = s_major == c_major and abs(s_minor - c_minor) <= 1
        except ValueError:  # not MAJOR.MINOR...: nothing to compare
            compatible = False
        if not compatible:
            warnings.warn(
                f"Qdrant server {self._target} runs version {server!r}, qdrant-client is {client}: "
                "major versions should match and minor versions differ by at most 1",
                UserWarning,
                stacklevel=2,
            )

    def read_meta(self) -> dict | None:
        if self._remote:  # the first call DatabaseGallery.open makes
            self._check_server_version()
        if not self._client.collection_exists(self._meta):
            return None
        points = self._client.retrieve(self._meta, ids=[0], with_payload=True)
        return _decoded(points[0].payload["meta"] if points else None)

    def create(self, dim: int, meta: str) -> None:
        models = self._models
        if not self._client.collection_exists(self._name):
            self._client.create_collection(
                self._name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT)
            )
        if not self._client.collection_exists(self._meta):
            self._client.create_collection(
                self._meta, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )
        self._client.upsert(self._meta, [models.PointStruct(id=0, vector=[0.0], payload={"meta": meta})])

    def get(self, ids: list[int]) -> dict[int, tuple]:
        if not ids:
            return {}
        points = self._client.retrieve(self._name, ids=ids, with_payload=True, with_vectors=True)
        return {
            int(p.id): (
                p.payload["name"],
                p.vector,
                float(p.payload["sum_norm"]),
                int(p.payload["count"]),
                p.payload.get("digests"),
            )
            for p in points
        }

    def upsert(self, ids, names, templates, sum_norms, counts, digests) -> None:
        models = self._models
        digests = digests if digests is not None else [None] * len(ids)
        points = [
            models.PointStruct(
                id=i,
                vector=t.tolist(),
                payload={"name": n, "sum_norm": float(s), "count": int(c)}
                | ({} if d is None else {"digests": d}),
            )
            for i, n, t, s, c, d in zip(ids, names, templates, sum_norms, counts, digests, strict=True)
        ]
        self._client.upsert(self._name, points, wait=True)

    def commit(self) -> None:
        """Nothing to do: ``wait=True`` writes are applied and searchable when ``upsert`` returns."""

    def delete(self, ids: list[int]) -> None:
        self._client.delete(self._name, points_selector=self._models.PointIdsList(points=ids), wait=True)

    def count(self) -> int:
        return int(self._client.count(self._name, exact=True).count)

    def names(self) -> list[str]:
        found, offset = [], None
        while True:
            points, offset = self._client.scroll(self._name, limit=4096, offset=offset, with_payload=["name"])
            found.extend(p.payload["name"] for p in points)
            if offset is None:
                return found

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        models = self._models
        requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=["name"]) for q in queries]
        answers = self._client.query_batch_points(self._name, requests=requests)
        return [[(p.payload["name"], p.score) for p in answer.points] for answer in answers]

    def drop(self) -> None:
        for name in (self._meta, self._name):
            self._client.delete_collection(name)

    def close(self) -> None:
        self._client.close()


_STORES = {"milvus": _MilvusStore, "qdrant": _QdrantStore}
