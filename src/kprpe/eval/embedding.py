"""Embedding whole evaluation sets, with an on-disk cache so another protocol on the same faces is free.

A cache entry is one ``.npz`` (no pickle: plain float arrays and a JSON string) named by a hash of the
bytes that define the model (weights and their config files), the data set's fingerprint, the crop mode and
the flip setting. Changing any of them gives a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..files import read_npz, write_npz
from ..inference import embed, iter_batches, to_model_input
from ..nn.keypoint_rpe import pinned_bias_path

__all__ = [
    "FaceBatchLoader",
    "FaceSource",
    "file_fingerprint",
    "model_fingerprint",
    "model_files",
    "default_cache_dir",
    "EmbeddingCache",
    "embed_faces",
    "embed_with_cache",
]

# loader(start, stop) -> (uint8 RGB images (b, S, S, 3), normalised keypoints (b, 5, 2))
FaceBatchLoader = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class FaceSource:
    """``count`` faces served in batches by ``load``; ``fingerprint`` identifies them for the cache."""

    count: int
    load: FaceBatchLoader
    fingerprint: str


_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered for this process while the file is untouched (inode change time:
    any write, or a reset modification time, moves it)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def model_files(weights: str | os.PathLike) -> list[Path]:
    """The files that define a checkpoint's model: the weights file and the configuration files beside it
    (``config.json``, ``model.yaml``; for the published ``<repo>/pretrained_model/model.*`` layout also the
    repo's ``config.json``)."""
    path = Path(weights)
    files = [path]
    for name in ("config.json", "model.yaml"):
        if (path.parent / name).is_file():
            files.append(path.parent / name)
    if path.parent.name == "pretrained_model" and (path.parent.parent / "config.json").is_file():
        files.append(path.parent.parent / "config.json")
    return files


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a data file: resolved path, size and modification time (nanoseconds)."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def model_fingerprint(path: str | os.PathLike) -> str:
    """Identity of the model a weights file defines, by content: sha256 of the weights and of the config files
    that belong to them (replacing any of them, even with the same size and time stamp, changes it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    return "|".join(f"{f.name}:{_sha256(f)}" for f in model_files(path))


def default_cache_dir() -> Path:
    """``$KPRPE_CACHE_DIR`` or ``~/.cache/kprpe/embeddings``."""
    env = os.environ.get("KPRPE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kprpe" / "embeddings"


class EmbeddingCache:
    """A directory of ``<key>.npz`` files holding ``embeddings (N, D)``, ``norms (N,)`` and ``meta``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @staticmethod
    def make_key(**parts) -> str:
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str, expected_count: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = read_npz(path)
            emb, norms = data["embeddings"], data["norms"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed and overwritten
        if expected_count is not None and emb.shape[0] != expected_count:
            return None
        return emb, norms

    def save(self, key: str, embeddings: np.ndarray, norms: np.ndarray, meta: dict) -> Path:
        return write_npz(
            self.path(key), embeddings=embeddings, norms=norms, meta=np.array(json.dumps(meta, default=str))
        )


def embed_faces(
    model: torch.nn.Module,
    source: FaceSource,
    *,
    flip: bool = True,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings ``(N, D)`` float32 and norms ``(N,)`` of every face of ``source``. A KP-RPE model's
    ``auto`` bias path is pinned to the gather: a reported number never depends on a timing under load."""
    with pinned_bias_path("gather"):
        return _embed_faces(
            model, source, flip=flip, batch_size=batch_size, device=device, progress=progress, desc=desc
        )


def _embed_faces(model, source, *, flip, batch_size, device, progress, desc) -> tuple[np.ndarray, np.ndarray]:
    units, norms = [], []
    for sl in tqdm(
        list(iter_batches(source.count, batch_size)), desc=desc, unit="batch", disable=not progress
    ):
        images, keypoints = source.load(sl.start, sl.stop)
        if images.shape[0] != sl.stop - sl.start or keypoints.shape != (images.shape[0], 5, 2):
            raise ValueError(
                f"face loader returned images {images.shape} and keypoints {keypoints.shape} for faces "
                f"{sl.start}..{sl.stop - 1}"
            )
        x = to_model_input(images)
        kp = torch.as_tensor(keypoints, dtype=torch.float32)
        unit, norm = embed(model, x, kp, flip=flip, batch_size=batch_size, device=device)
        units.append(unit.numpy().astype(np.float32))
        norms.append(norm.numpy().astype(np.float32))
    if not units:
        raise ValueError("no faces to embed")
    return np.concatenate(units), np.concatenate(norms)


def embed_with_cache(
    model_loader: Callable[[], torch.nn.Module],
    weights: str | os.PathLike,
    source: FaceSource,
    *,
    mode: str,
    flip: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Embeddings from the cache, or computed (model loaded only then) and stored.

    Returns ``(embeddings, norms, from_cache)``. ``cache_dir=None`` disables the cache.
    """
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    key = EmbeddingCache.make_key(
        weights=model_fingerprint(weights), data=source.fingerprint, mode=mode, flip=flip, count=source.count
    )
    if cache is not None:
        hit = cache.load(key, expected_count=source.count)
        if hit is not None:
            return hit[0], hit[1], True
    emb, norms = embed_faces(
        model_loader(), source, flip=flip, batch_size=batch_size, device=device, progress=progress, desc=desc
    )
    if cache is not None:
        cache.save(key, emb, norms, dict(weights=str(weights), data=source.fingerprint, mode=mode, flip=flip))
    return emb, norms, False
