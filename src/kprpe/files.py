"""Atomic writers for the package's outputs (JSON, Markdown, CSV, NPZ, PNG) and a pickle-free NPZ reader.

Every writer builds the whole content in memory, writes it to a temporary file beside the target and renames
it into place, so a crash or Ctrl-C never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import KprpeError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "to_jsonable",
    "write_json",
    "write_csv",
    "write_npz",
    "read_npz",
    "NpzFormatError",
    "write_png",
    "OutputFolderError",
    "check_output_folder",
    "OutputPathError",
    "check_output_path",
    "check_not_input",
    "staged_folder",
]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (safetensors, torch.save,
    matplotlib); on success it is fsynced and renamed into place, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` (parents created), fsync it, then rename it into
    place."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, written atomically (no newline translation: ``\\n`` stays ``\\n`` on every platform)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj):
    """Nested data -> what :mod:`json` writes: numpy arrays and scalars become lists and numbers, paths
    strings, dict keys strings; NaN becomes ``null`` and infinities ``"inf"`` / ``"-inf"`` (strict JSON has
    neither)."""
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` (after :func:`to_jsonable`) as indented JSON with a final newline."""
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A header row and data rows, ``\\n`` line ends, UTF-8."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Uncompressed ``.npz`` of plain arrays (no object arrays, so it loads with ``allow_pickle=False``)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; store strings as fixed-width unicode")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


class NpzFormatError(KprpeError, ValueError):
    """An ``.npz`` that is truncated, corrupt (bad CRC) or holds pickled objects."""


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` with ``allow_pickle=False`` (never executes code from the file).

    A truncated, corrupt or pickle-bearing file raises :class:`NpzFormatError` naming it."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise NpzFormatError(f"{path}: not a readable plain .npz ({type(exc).__name__}: {exc})") from None


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grayscale array -> PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


class OutputPathError(KprpeError, ValueError):
    """An output a command may not write: one of its inputs, or an existing file without ``--overwrite``."""


class OutputFolderError(OutputPathError):
    """An output folder that a command may not write: it holds files the command did not create, or inputs."""


def _existing(path: Path) -> Path | None:
    """``path`` with every symbolic link resolved, or None when nothing is there."""
    return path.resolve() if path.exists() else None


def check_not_input(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    folder: bool = False,
    inside: bool = True,
    error: type = None,
) -> None:
    """Inputs are never written over: raise :class:`OutputPathError` when ``out`` is one of ``inputs`` (a
    symbolic or hard link to one included), when ``inside`` and ``out`` is an existing file inside an input
    folder (it may be one of the photos read from there), or — for an output ``folder`` — when it contains
    an input. Inputs that are not paths (e.g. a published repo id) are skipped."""
    out = Path(out)
    error = error or (OutputFolderError if folder else OutputPathError)
    resolved = out.resolve()
    for given in inputs:
        found = _existing(Path(given))
        if found is None:
            continue
        same = resolved == found or (out.exists() and os.path.samefile(out, found))
        inside_input = inside and not folder and found.is_dir() and found in resolved.parents and out.exists()
        if folder and (same or resolved in found.parents):
            raise error(f"output folder {out} contains the input {given}; write the output elsewhere")
        if same or inside_input:
            raise error(
                f"output {out} would overwrite the input {given}; inputs are never modified — write the "
                "output elsewhere"
            )


def check_output_path(
    out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """The rule for every file a command writes (and each file written beside it, e.g. ``.idx``, ``.json``).

    Raises :class:`OutputPathError` when ``out`` is one of ``inputs`` (after resolving links; even with
    ``overwrite``), an existing file inside an input folder, a folder, or an existing file while
    ``overwrite`` is false — kprpe never replaces a file it was not asked to."""
    out = Path(out)
    check_not_input(out, inputs)
    if out.is_dir():
        raise OutputPathError(f"output {out} is a folder; give a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputPathError(f"output {out} already exists; pass --overwrite to replace it")
    return out


def check_output_folder(
    out: str | os.PathLike, marker: str, inputs: Sequence[str | os.PathLike] = ()
) -> None:
    """Raise :class:`OutputFolderError` unless :func:`staged_folder` may write ``out`` (see there)."""
    out = Path(out)
    check_not_input(out, inputs, folder=True)
    if out.exists():
        if not out.is_dir():
            raise OutputFolderError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise OutputFolderError(
                f"output folder {out} is not empty and was not written by this command (no {marker}); "
                "choose a new or empty folder — kprpe never overwrites files it did not create"
            )


@contextmanager
def staged_folder(
    out: str | os.PathLike, marker: str, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Build a command's output folder in a staging folder beside it and commit it as a whole.

    ``out`` must be new, empty, or a folder this command wrote before (it holds ``marker``, which the staged
    folder gets on commit); it must not contain any of ``inputs``. On success the previous output is replaced
    in one rename (a re-run never mixes new files with old ones); on any error the staging folder is removed
    and ``out`` is left as it was.
    """
    out = Path(out)
    check_output_folder(out, marker, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        (staging / marker).write_text(
            "written by kprpe; this folder is replaced as a whole on the next run\n"
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        if out.exists() and any(out.iterdir()):
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
