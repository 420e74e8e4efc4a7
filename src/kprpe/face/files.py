"""Atomic writers for the pipeline's outputs (PNG crops, CSV, NPZ): a crash never leaves a half-written file."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["atomic_write_bytes", "write_png", "write_csv", "write_npz", "read_npz"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """RGB uint8 ``(H, W, 3)`` -> PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Uncompressed ``.npz`` of plain arrays (no object arrays, so it loads with ``allow_pickle=False``)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; store strings as fixed-width unicode")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` with ``allow_pickle=False`` (never executes code from the file)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
