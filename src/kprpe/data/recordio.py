"""insightface / MXNet RecordIO (``.rec`` + ``.idx``) in pure Python: random-access reader and writer.

Layout of one record (little endian)::

    uint32 magic = 0xced7230a
    uint32 lrec   upper 3 bits: continuation flag (0 = whole record), lower 29 bits: payload length
    payload       padded with zeros to a multiple of 4 bytes

An image record's payload is the header ``<IfQQ`` (flag, label, id, id2), then ``flag`` float32 labels when
``flag > 0`` (in which case the scalar ``label`` is unused), then the encoded image (JPEG/PNG). The ``.idx``
file has one ``key\\toffset`` line per record. insightface data sets start with record 0, a header whose
``label[0]`` is the first image key (and ``label[1]`` one past the last image key); identity header records
follow the images and are not images.

The reader opens the ``.rec`` file lazily and re-opens it after a fork (the handle is keyed by process id), so
one reader object can be handed to DataLoader worker processes safely.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError

__all__ = [
    "RECORDIO_MAGIC",
    "RecordIOError",
    "RecordHeader",
    "pack_record",
    "unpack_record",
    "RecordIOReader",
    "RecordIOWriter",
    "index_path_for",
]

RECORDIO_MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")
_LREC_LENGTH_MASK = (1 << 29) - 1
_MAX_PAYLOAD = _LREC_LENGTH_MASK


class RecordIOError(KprpeError, ValueError):
    """A RecordIO file or record that cannot be read; the message names the file, key and offset."""


@dataclass(frozen=True)
class RecordHeader:
    """``flag``: number of extra float labels (0: scalar ``label``); ``label``: float or tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int = 0
    id2: int = 0


def index_path_for(rec_path: str | os.PathLike) -> Path:
    """``train.rec`` -> ``train.idx`` (the insightface convention)."""
    return Path(rec_path).with_suffix(".idx")


def pack_record(header: RecordHeader, data: bytes = b"") -> bytes:
    """Payload bytes (header, extra labels, data) of one record, without the magic/length framing."""
    if isinstance(header.label, (tuple, list, np.ndarray)):
        labels = np.asarray(header.label, dtype=np.float32).ravel()
        if labels.size == 0:
            raise ValueError("a record with a label vector needs at least one label")
        head = _HEADER.pack(labels.size, 0.0, header.id, header.id2)
        return head + labels.tobytes() + bytes(data)
    if header.flag != 0:
        raise ValueError(f"flag {header.flag} > 0 needs a label vector, got scalar label {header.label!r}")
    return _HEADER.pack(0, float(header.label), header.id, header.id2) + bytes(data)


def unpack_record(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Inverse of :func:`pack_record`: ``(header, data)``."""
    if len(payload) < _HEADER.size:
        raise RecordIOError(
            f"record payload of {len(payload)} bytes is shorter than the {_HEADER.size}-byte header"
        )
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    offset = _HEADER.size
    if flag > 0:
        end = offset + 4 * flag
        if end > len(payload):
            raise RecordIOError(
                f"record header announces {flag} labels but the payload has only {len(payload)} bytes"
            )
        labels = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=offset))
        return RecordHeader(flag, labels, id_, id2), payload[end:]
    return RecordHeader(0, float(label), id_, id2), payload[offset:]


def _read_index(idx_path: Path) -> dict[int, int]:
    if not idx_path.is_file():
        raise RecordIOError(
            f"index file not found: {idx_path} (RecordIO needs the .idx beside the .rec; if a write of this "
            "pair was "
            f"interrupted, write it again)"
        )
    index: dict[int, int] = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise RecordIOError(f"{idx_path}:{line_no}: expected 'key<TAB>offset', got {line[:60]!r}")
            try:
                key, offset = int(parts[0]), int(parts[1])
            except ValueError as exc:
                raise RecordIOError(
                    f"{idx_path}:{line_no}: key and offset must be integers, got {line[:60]!r}"
                ) from exc
            if key in index:
                raise RecordIOError(f"{idx_path}:{line_no}: duplicate key {key}")
            index[key] = offset
    return index


class RecordIOReader:
    """Random access to an indexed RecordIO file: ``reader.read(key) -> payload bytes``.

    ``keys`` lists the index keys in file order. Picklable and fork-safe: the file handle is opened on first
    use in each process.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else index_path_for(self.rec_path)
        if not self.rec_path.is_file():
            raise RecordIOError(f"RecordIO file not found: {self.rec_path}")
        self.index = _read_index(self.idx_path)
        self.keys = sorted(self.index)
        self._size = self.rec_path.stat().st_size
        self._handle = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state

    def _file(self):
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            # After a fork the inherited handle shares its offset with the parent: never reuse it.
            self._handle = open(self.rec_path, "rb")  # noqa: SIM115 - kept open for the reader's lifetime
            self._pid = pid
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._pid = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def read(self, key: int) -> bytes:
        """Payload of record ``key`` (continuation parts joined). Raises :class:`RecordIOError` on damage."""
        if key not in self.index:
            raise RecordIOError(f"{self.rec_path}: key {key} is not in the index {self.idx_path}")
        offset = self.index[key]
        where = f"{self.rec_path}: record key {key} at offset {offset}"
        if offset < 0 or offset + 8 > self._size:
            raise RecordIOError(f"{where}: offset is outside the file ({self._size} bytes)")
        f = self._file()
        f.seek(offset)
        parts = []
        while True:
            frame = f.read(8)
            if len(frame) < 8:
                raise RecordIOError(f"{where}: file ends inside a record header")
            magic, lrec = struct.unpack("<II", frame)
            if magic != RECORDIO_MAGIC:
                raise RecordIOError(
                    f"{where}: bad magic 0x{magic:08x} (expected 0x{RECORDIO_MAGIC:08x}); the file or index "
                    "is corrupt"
                )
            cflag, length = lrec >> 29, lrec & _LREC_LENGTH_MASK
            data = f.read(length)
            if len(data) < length:
                raise RecordIOError(
                    f"{where}: record says {length} bytes but the file ends after {len(data)}"
                )
            parts.append(data)
            pad = (-length) % 4
            if pad:
                f.seek(pad, os.SEEK_CUR)
            if cflag in (0, 3):  # whole record, or last part of a split record
                break
            if cflag not in (1, 2):
                raise RecordIOError(f"{where}: invalid continuation flag {cflag}")
        return b"".join(parts)

    def read_header(self, key: int) -> RecordHeader:
        return unpack_record(self.read(key))[0]

    def read_record(self, key: int) -> tuple[RecordHeader, bytes]:
        return unpack_record(self.read(key))


class RecordIOWriter:
    """Write an indexed RecordIO file atomically: records go to temporary files renamed on :meth:`close`.

    Use as a context manager; if the block raises, the partial files are removed and nothing is replaced.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else index_path_for(self.rec_path)
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_rec = tempfile.mkstemp(
            dir=self.rec_path.parent, prefix=f".{self.rec_path.name}.", suffix=".tmp"
        )
        self._rec = os.fdopen(fd, "wb")
        try:
            fd, self._tmp_idx = tempfile.mkstemp(
                dir=self.idx_path.parent, prefix=f".{self.idx_path.name}.", suffix=".tmp"
            )
        except OSError:
            self._rec.close()
            os.unlink(self._tmp_rec)
            raise
        self._idx = os.fdopen(fd, "w", encoding="ascii")
        self._offsets: dict[int, tuple[int, int]] = {}  # key -> (offset, payload length)
        self._closed = False

    def write(self, key: int, payload: bytes) -> None:
        """Append one record (payload from :func:`pack_record`) under ``key``."""
        if self._closed:
            raise RecordIOError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._offsets:
            raise RecordIOError(f"{self.rec_path}: key {key} written twice")
        if len(payload) > _MAX_PAYLOAD:
            raise RecordIOError(
                f"{self.rec_path}: record {key} has {len(payload)} bytes; at most {_MAX_PAYLOAD} fit one "
                "record"
            )
        offset = self._rec.tell()
        self._offsets[key] = (offset, len(payload))
        self._rec.write(struct.pack("<II", RECORDIO_MAGIC, len(payload)))
        self._rec.write(payload)
        self._rec.write(b"\x00" * ((-len(payload)) % 4))
        self._idx.write(f"{key}\t{offset}\n")

    def rewrite(self, key: int, payload: bytes) -> None:
        """Replace the payload of an already written record with one of the same length (a header whose counts
        are known only at the end is written first as a placeholder, so it keeps offset 0)."""
        if self._closed:
            raise RecordIOError(f"{self.rec_path}: writer is closed")
        offset, length = self._offsets.get(int(key), (None, None))
        if offset is None:
            raise RecordIOError(f"{self.rec_path}: key {key} was never written")
        if len(payload) != length:
            raise RecordIOError(
                f"{self.rec_path}: record {key} has {length} bytes; a rewrite must keep that length"
            )
        end = self._rec.tell()
        self._rec.seek(offset + 8)
        self._rec.write(payload)
        self._rec.seek(end)

    def close(self) -> None:
        """Commit the pair. The old ``.idx`` is removed first, then the new ``.rec`` and ``.idx`` are renamed
        into place: a crash at any point leaves either the complete new pair or a ``.rec`` without an index
        (which every reader refuses loudly) — never a ``.rec`` with an index of another file."""
        if self._closed:
            return
        self._closed = True
        try:
            umask = os.umask(0)
            os.umask(umask)
            for f, tmp in ((self._rec, self._tmp_rec), (self._idx, self._tmp_idx)):
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
            if self.idx_path.exists():
                self.idx_path.unlink()
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(self._tmp_idx, self.idx_path)
        finally:
            self._remove_temporaries()

    def abort(self) -> None:
        """Drop everything written so far; the files at the target paths are left untouched."""
        if self._closed:
            return
        self._closed = True
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for f, tmp in ((self._rec, self._tmp_rec), (self._idx, self._tmp_idx)):
            try:
                f.close()
            except OSError:
                pass
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
