"""Thumbnails of enrolled faces, kept in a folder beside a gallery and keyed by identity, so they work with
any gallery engine (an ``.npz`` index, or a database that stores vectors only).

Layout: ``<folder>/<key>/<n>.jpg``, ``key`` = the first 32 hex digits of the identity's UTF-8 sha256 (no
identity text ever becomes a path), ``n`` = 0 .. ``per_identity - 1`` in enrolment order (later faces of a
full identity are not kept). Each file is a ``size`` x ``size`` JPEG of the aligned crop, written atomically;
removing an identity renames its folder away before deleting it, so a reader never sees half of one.
Task-neutral: it stores small square images, whatever they show.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import KprpeError

__all__ = [
    "MAX_THUMBNAIL_BYTES",
    "THUMBNAIL_SIZE",
    "ThumbnailError",
    "ThumbnailStore",
    "thumbnails_beside",
]

THUMBNAIL_SIZE = 56  # half the 112x112 crop: enough to recognise a face, ~2 KB as JPEG
PER_IDENTITY = 4
# A 56x56 JPEG is a few KB; anything far larger in the folder was not written here and is not served.
MAX_THUMBNAIL_BYTES = 64 * 1024
_KEY = re.compile(r"[0-9a-f]{32}")


class ThumbnailError(KprpeError, ValueError):
    """A thumbnail that does not exist, or a request for one that names no stored thumbnail."""


def thumbnails_beside(index_path: str | os.PathLike) -> Path:
    """The default thumbnail folder of a gallery file: ``gallery.npz`` -> ``gallery.npz.thumbnails``."""
    path = Path(index_path)
    return path.with_name(path.name + ".thumbnails")


class ThumbnailStore:
    """Up to ``per_identity`` ``size`` x ``size`` JPEG thumbnails per identity in ``folder``."""

    def __init__(
        self, folder: str | os.PathLike, *, size: int = THUMBNAIL_SIZE, per_identity: int = PER_IDENTITY
    ) -> None:
        if not 8 <= size <= 112 or per_identity < 1:
            raise ThumbnailError(f"thumbnails must be 8..112 pixels and >= 1 per identity, got {size}, "
                                 f"{per_identity}")
        self.folder = Path(folder)
        self.size = size
        self.per_identity = per_identity

    @staticmethod
    def key(identity: str) -> str:
        """The folder name of ``identity``'s thumbnails (a hash: names never reach the file system)."""
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]

    def numbers(self, identity: str) -> list[int]:
        """The stored thumbnails of ``identity``, in enrolment order."""
        folder = self.folder / self.key(identity)
        return [n for n in range(self.per_identity) if (folder / f"{n}.jpg").is_file()]

    def add(self, identity: str, image: np.ndarray) -> int | None:
        """Store a thumbnail of ``image`` (an RGB uint8 crop) for ``identity``; its number, or None when the
        identity already has ``per_identity``."""
        from PIL import Image

        from ..files import atomic_write_bytes

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ThumbnailError(
                f"a thumbnail is made from an RGB uint8 image, got {image.dtype} {image.shape}"
            )
        free = [n for n in range(self.per_identity) if n not in self.numbers(identity)]
        if not free:
            return None
        small = Image.fromarray(np.ascontiguousarray(image)).resize((self.size, self.size), Image.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=90)
        atomic_write_bytes(self.folder / self.key(identity) / f"{free[0]}.jpg", buffer.getvalue())
        return free[0]

    def read(self, key: str, number: int) -> bytes:
        """The JPEG bytes of thumbnail ``number`` of the identity whose :meth:`key` is ``key``."""
        if not _KEY.fullmatch(key) or not 0 <= number < self.per_identity:
            raise ThumbnailError(f"no thumbnail {key[:40]!r}/{number}")
        path = self.folder / key / f"{number}.jpg"
        try:
            if path.is_symlink() or path.stat().st_size > MAX_THUMBNAIL_BYTES:
                raise ThumbnailError(f"{path} is not a thumbnail this store wrote (a link, or too large)")
            return path.read_bytes()
        except FileNotFoundError:
            raise ThumbnailError(f"no thumbnail {key}/{number}") from None

    def clear(self) -> None:
        """Delete every thumbnail (the gallery they belonged to was replaced)."""
        if self.folder.is_dir():
            doomed = self.folder.with_name(f".{self.folder.name}.removed-{uuid.uuid4().hex[:8]}")
            os.replace(self.folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def remove(self, identity: str) -> bool:
        """Delete every thumbnail of ``identity``; False when it had none."""
        folder = self.folder / self.key(identity)
        if not folder.is_dir():
            return False
        doomed = self.folder / f".removed-{folder.name}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, doomed)  # one rename: readers see all of it or none
        shutil.rmtree(doomed, ignore_errors=True)
        return True
