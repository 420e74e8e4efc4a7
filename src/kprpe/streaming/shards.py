"""Embedding outputs that survive interruption: shards committed one at a time, each naming the inputs it
completes, so a re-run skips exactly what is already written (no duplicate, no missing row).

Three kinds of output, chosen by the ``-o`` path:

* ``OUT.parquet`` -- a Parquet data set: a folder of ``part-NNNNNN.parquet`` shards (pyarrow, the
  ``kprpe[parquet]`` extra) that ``pyarrow.parquet.read_table``, pandas, DuckDB or Spark read as one table.
* ``OUT.npz`` -- one ``.npz`` (``allow_pickle=False``), the historical format. Shards are staged in the
  hidden folder ``.OUT.npz.parts`` beside it while the run goes on and assembled at the end, column by
  column, without holding the embeddings in memory twice.
* any other ``OUT`` -- a folder of shards: Parquet when pyarrow is installed, else ``.npz`` shards.

A shard is written to a hidden temporary file and renamed into place: that rename is the commit. Its
metadata lists the tasks it completes (a photo, or a video segment) and the failures among them. The folder's
``_kprpe_embed.json`` records the model fingerprint and the options that change the rows; a run with other
weights or options is refused (``overwrite=True`` replaces an output this command made, nothing else).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from ..files import atomic_path, atomic_write_text
from .stream import (
    DEFAULT_FPS,
    SEGMENT_FRAMES,
    Completed,
    EmbeddedTask,
    FaceRow,
    Runner,
    StreamStats,
    expand_media_paths,
    stream_embeddings,
)

__all__ = [
    "EMBED_FORMAT",
    "SHARD_ROWS",
    "EmbedOutputError",
    "EmbedSummary",
    "ShardFolder",
    "embed_to_output",
    "parquet_available",
    "read_embeddings",
]

EMBED_FORMAT = "kprpe-embeddings-v1"
HEADER = "_kprpe_embed.json"  # "_" prefix: Parquet readers skip it when they read the folder as a table
SHARD_ROWS = 1024  # rows per committed shard (a crash loses at most this much work, or SHARD_SECONDS of it)
SHARD_SECONDS = 60.0
_PARQUET_HINT = "install the optional extra: pip install 'kprpe[parquet]' (pyarrow)"

# canonical column names (Parquet, shards, read_embeddings) -> the historical names of the single .npz
COLUMNS = (
    "file",
    "name",
    "frame",
    "time",
    "face_index",
    "box",
    "landmarks",
    "keypoints",
    "score",
    "embedding",
    "norm",
)
NPZ_NAMES = {
    "file": "sources",
    "name": "names",
    "box": "boxes",
    "score": "scores",
    "embedding": "embeddings",
    "norm": "norms",
}
_STRING_COLUMNS = ("file", "name")
_DTYPES = {
    "frame": np.int64,
    "time": np.float64,
    "face_index": np.int64,
    "box": np.float32,
    "landmarks": np.float32,
    "keypoints": np.float32,
    "score": np.float32,
    "embedding": np.float32,
    "norm": np.float32,
}


class EmbedOutputError(KprpeError, ValueError):
    """An output that cannot be written or continued (another model's, other options, not ours, corrupt)."""


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbedOutputError(f"Parquet output needs pyarrow; {_PARQUET_HINT} (or write .npz)") from None
    return pa, pq


def _trailing_shapes(dim: int, num_keypoints: int) -> dict[str, tuple[int, ...]]:
    return {
        "box": (4,),
        "landmarks": (num_keypoints, 2),
        "keypoints": (num_keypoints, 2),
        "embedding": (dim,),
    }


def rows_to_columns(rows: list[FaceRow], dim: int, num_keypoints: int) -> dict[str, np.ndarray]:
    """Embedded face rows -> one array per column (canonical names)."""
    shapes = _trailing_shapes(dim, num_keypoints)
    columns: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        values = [getattr(row, name) for row in rows]
        if name in _STRING_COLUMNS:
            columns[name] = np.asarray(values, dtype=str).reshape(-1)
        else:
            columns[name] = np.asarray(values, dtype=_DTYPES[name]).reshape(len(rows), *shapes.get(name, ()))
    return columns


def _task_entries(tasks: list[EmbeddedTask]) -> tuple[list, list]:
    # [key, segment, rows, end, frames] (+ the next frame's segment when a time gap follows the segment)
    entries = [
        [t.task.key, t.task.segment, len(t.rows), bool(t.end), int(t.frames)]
        + ([int(t.next_segment)] if (t.next_segment or 0) > t.task.segment + 1 else [])
        for t in tasks
    ]
    failures = [[t.task.path, t.failure] for t in tasks if t.failure is not None]
    return entries, failures


# ------------------------------------------------------------------------------------------ shard files


def _write_parquet_shard(path: Path, columns: dict[str, np.ndarray], manifest: dict) -> None:
    pa, pq = _pyarrow()
    rows = len(columns["file"])

    def fixed(values: np.ndarray, dtype) -> object:
        width = int(np.prod(values.shape[1:]))
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=dtype)
        return pa.FixedSizeListArray.from_arrays(flat, width)

    arrays = {
        "file": pa.array(columns["file"].tolist(), type=pa.string()),
        "name": pa.array(columns["name"].tolist(), type=pa.string()),
        "frame": pa.array(columns["frame"], type=pa.int64()),
        "time": pa.array(columns["time"], type=pa.float64()),
        "face_index": pa.array(columns["face_index"], type=pa.int64()),
        "box": fixed(columns["box"], pa.float32()),
        "landmarks": fixed(columns["landmarks"], pa.float32()),
        "keypoints": fixed(columns["keypoints"], pa.float32()),
        "score": pa.array(columns["score"], type=pa.float32()),
        "embedding": fixed(columns["embedding"], pa.float32()),
        "norm": pa.array(columns["norm"], type=pa.float32()),
    }
    table = pa.table(arrays).replace_schema_metadata({b"kprpe": json.dumps(manifest).encode()})
    assert table.num_rows == rows
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def _read_parquet_manifest(path: Path) -> dict:
    _, pq = _pyarrow()
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[b"kprpe"])
    except (OSError, KeyError, ValueError) as exc:
        raise EmbedOutputError(f"{path}: not a readable kprpe shard ({type(exc).__name__}: {exc})") from None


def _read_parquet_columns(path: Path, names: Iterable[str], shapes: dict) -> dict[str, np.ndarray]:
    _, pq = _pyarrow()
    names = list(names)
    try:
        table = pq.read_table(path, columns=names)
    except (OSError, ValueError) as exc:
        raise EmbedOutputError(f"{path}: not a readable kprpe shard ({type(exc).__name__}: {exc})") from None
    out = {}
    for name in names:
        column = table.column(name).combine_chunks()
        if name in _STRING_COLUMNS:
            out[name] = np.asarray(column.to_pylist(), dtype=str).reshape(-1)
        elif name in shapes:
            flat = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.astype(_DTYPES[name], copy=False).reshape(table.num_rows, *shapes[name])
        else:
            out[name] = column.to_numpy(zero_copy_only=False).astype(_DTYPES[name], copy=False)
    return out


def _write_npz_shard(path: Path, columns: dict[str, np.ndarray], manifest: dict) -> None:
    from ..files import write_npz

    stored = {NPZ_NAMES.get(name, name): values for name, values in columns.items()}
    write_npz(path, **stored, manifest=np.asarray(json.dumps(manifest)))


def _read_npz_manifest(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["manifest"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise EmbedOutputError(f"{path}: not a readable kprpe shard ({type(exc).__name__}: {exc})") from None


def _read_npz_columns(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Columns (canonical names) of a shard or of the single .npz (both store the historical names)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[NPZ_NAMES.get(name, name)] for name in names}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise EmbedOutputError(
            f"{path}: not a readable kprpe embeddings file ({type(exc).__name__}: {exc})"
        ) from None


# ----------------------------------------------------------------------------------------- shard folder


def _normalise(value):
    return json.loads(json.dumps(value))


def _check_settings(output: Path, found: dict, wanted: dict) -> None:
    found, wanted = _normalise(found), _normalise(wanted)
    if found.get("model_fingerprint") != wanted.get("model_fingerprint"):
        old, new = str(found.get("model_fingerprint"))[:12], str(wanted.get("model_fingerprint"))[:12]
        raise EmbedOutputError(
            f"{output} was made by another model (fingerprint {old}..., these weights {new}...); "
            "write to a new output, or pass --overwrite to replace it"
        )
    changed = [key for key in sorted(set(found) | set(wanted)) if found.get(key) != wanted.get(key)]
    if changed:
        detail = "; ".join(f"{key}: {found.get(key)!r} there, {wanted.get(key)!r} now" for key in changed)
        raise EmbedOutputError(
            f"{output} was made with other options ({detail}); use the same options to continue it, write to "
            "a new output, or pass --overwrite to replace it"
        )


class ShardFolder:
    """A folder of committed shards plus ``_kprpe_embed.json``; one writer at a time (a lock file)."""

    def __init__(self, folder: Path, shard_format: str, header: dict) -> None:
        self.folder = folder
        self.shard_format = shard_format
        self.header = header
        self.created = False
        self._lock = None

    @property
    def settings(self) -> dict:
        return self.header["settings"]

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        settings: dict,
        *,
        shard_format: str = "auto",
        overwrite: bool = False,
        info: dict | None = None,
        label: str | None = None,
    ) -> ShardFolder:
        """Continue the output in ``folder`` (same model and settings) or start it. ``label``: how errors
        name the output (the user's ``-o``)."""
        folder = Path(folder)
        label = label or str(folder)
        header_path = folder / HEADER
        if folder.exists() and not folder.is_dir():
            raise EmbedOutputError(f"output {label} exists and is not a folder of shards")
        header = None
        if header_path.is_file():
            try:
                header = json.loads(header_path.read_text(encoding="utf-8"))
                if not isinstance(header, dict) or header.get("format") != EMBED_FORMAT:
                    raise ValueError(
                        f"format {header.get('format') if isinstance(header, dict) else header!r}"
                    )
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise EmbedOutputError(f"{header_path}: not a kprpe embed header ({exc})") from None
        elif folder.is_dir() and any(folder.iterdir()):
            raise EmbedOutputError(
                f"output folder {label} is not empty and was not written by kprpe embed (no {HEADER}); "
                "choose a new output — kprpe never overwrites files it did not create"
            )
        if header is not None and overwrite:
            store = cls(folder, header.get("shard_format", "npz"), header)
            store._lock_folder()
            store._remove_shards()
            store._unlock()
            header = None
        created = header is None
        if header is not None:
            _check_settings(Path(label), header.get("settings", {}), settings)
            shard_format = header.get("shard_format")
            if shard_format == "parquet":
                _pyarrow()
        else:
            if shard_format == "auto":
                shard_format = "parquet" if parquet_available() else "npz"
            elif shard_format == "parquet":
                _pyarrow()
            header = {
                "format": EMBED_FORMAT,
                "shard_format": shard_format,
                "settings": _normalise(settings),
                **_normalise(info or {}),
            }
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(header_path, json.dumps(header, indent=2) + "\n")
        store = cls(folder, shard_format, header)
        store.created = created
        store._lock_folder()
        store._remove_temporaries()
        return store

    # ----------------------------------------------------------------------------------------- locking

    def _lock_folder(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        handle = open(self.folder / ".lock", "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise EmbedOutputError(f"another kprpe embed is writing {self.folder} right now") from None
        self._lock = handle

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def close(self) -> None:
        self._unlock()

    def _remove_temporaries(self) -> None:
        for stale in self.folder.glob(".part-*.tmp"):  # a shard whose commit a crash interrupted
            stale.unlink(missing_ok=True)

    def _remove_shards(self) -> None:
        for shard in self.folder.glob("part-*.*"):
            shard.unlink()
        self._remove_temporaries()

    def remove(self) -> None:
        """Delete the whole folder (nothing of value in it: used when a run committed nothing)."""
        self._unlock()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ shards

    @property
    def suffix(self) -> str:
        return ".parquet" if self.shard_format == "parquet" else ".npz"

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(f"part-*{self.suffix}"))

    def manifests(self) -> Iterator[tuple[Path, dict]]:
        """Each shard with its manifest, checked to be this output's: same model and options."""
        read = _read_parquet_manifest if self.shard_format == "parquet" else _read_npz_manifest
        for shard in self.shards():
            manifest = read(shard)
            self._check_owner(shard, manifest)
            yield shard, manifest

    def _check_owner(self, shard: Path, manifest: dict) -> None:
        """A shard copied in from another output (other weights or options) would mix two models' rows into
        one output: each shard names the settings it was made with, and must name these."""
        wanted = _normalise(self.settings)
        found = manifest.get("settings") if isinstance(manifest, dict) else None
        fix = "remove it, or pass --overwrite to start the output afresh"
        if not isinstance(found, dict) or "model_fingerprint" not in found:
            raise EmbedOutputError(
                f"{shard} names no model fingerprint (copied in, or written by a kprpe before shards "
                f"carried one), so its rows cannot be trusted to come from these weights; {fix}"
            )
        if found["model_fingerprint"] != wanted.get("model_fingerprint"):
            raise EmbedOutputError(
                f"{shard} was made by another model (fingerprint {str(found['model_fingerprint'])[:12]}..., "
                f"this output's {str(wanted.get('model_fingerprint'))[:12]}...); {fix}"
            )
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise EmbedOutputError(f"{shard} was made with other options ({', '.join(changed)}); {fix}")

    def columns(self, shard: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
        if self.shard_format == "parquet":
            return _read_parquet_columns(shard, names, self._shapes())
        return _read_npz_columns(shard, names)

    def _shapes(self) -> dict:
        return _trailing_shapes(int(self.settings["output_dim"]), int(self.settings["num_keypoints"]))

    def commit(self, tasks: list[EmbeddedTask]) -> Path:
        """Write one shard holding every row of ``tasks`` (complete tasks only) and saying they are done."""
        rows = [row for task in tasks for row in task.rows]
        columns = rows_to_columns(rows, int(self.settings["output_dim"]), int(self.settings["num_keypoints"]))
        entries, failures = _task_entries(tasks)
        manifest = {
            "format": EMBED_FORMAT,
            "rows": len(rows),
            "tasks": entries,
            "failures": failures,
            "settings": self.settings,  # names the model: a shard copied into another output is refused
        }
        existing = self.shards()
        number = int(existing[-1].name.split("-")[1].split(".")[0]) + 1 if existing else 0
        path = self.folder / f"part-{number:06d}{self.suffix}"
        if self.shard_format == "parquet":
            _write_parquet_shard(path, columns, manifest)
        else:
            _write_npz_shard(path, columns, manifest)
        return path


def _completed_from(manifests: Iterable[dict], completed: Completed) -> tuple[int, list[list[str]]]:
    rows, failures = 0, []
    for manifest in manifests:
        rows += int(manifest.get("rows", 0))
        for key, segment, count, end, frames, *jump in manifest.get("tasks", []):
            completed.add(key, int(segment), int(count), bool(end), int(frames), *(int(j) for j in jump[:1]))
        failures.extend(manifest.get("failures", []))
    return rows, failures


# -------------------------------------------------------------------------------------- single .npz file


def _npz_write_streaming(
    target: Path,
    sources: list[Callable[[list[str]], dict]],
    rows: int,
    shapes: dict,
    extra: dict[str, np.ndarray],
) -> None:
    """Assemble the single ``.npz`` column by column from ``sources`` (each returns the columns it holds),
    so the embeddings are never held twice (once per shard at most)."""
    with atomic_path(target) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in COLUMNS:
                if name in _STRING_COLUMNS:
                    width = max([1, *(int(source([name])[name].dtype.itemsize // 4) for source in sources)])
                    dtype = np.dtype(f"<U{width}")
                else:
                    dtype = np.dtype(_DTYPES[name])
                shape = (rows, *shapes.get(name, ()))
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": shape,
                }
                written = 0
                with archive.open(f"{NPZ_NAMES.get(name, name)}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, header)
                    for source in sources:
                        values = np.ascontiguousarray(source([name])[name], dtype=dtype)
                        written += len(values)
                        member.write(values.tobytes())
                if written != rows:
                    raise EmbedOutputError(f"{target}: shards hold {written} rows of {name}, expected {rows}")
            for name, values in extra.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(values), allow_pickle=False)


def _read_final_npz(path: Path) -> tuple[dict, list, list, int]:
    """(metadata, task entries, failures, rows) of a single ``.npz`` written by this command."""
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data["metadata"]))
            completed = (
                [json.loads(str(entry)) for entry in data["completed"]] if "completed" in data else None
            )
            failures = data["failures"].reshape(-1, 2).tolist() if "failures" in data else []
            rows = int(data["embeddings"].shape[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise EmbedOutputError(
            f"{path} exists and is not a kprpe embeddings .npz ({type(exc).__name__}: {exc}); choose a new "
            "output — kprpe never overwrites files it did not create"
        ) from None
    if not isinstance(metadata, dict):
        raise EmbedOutputError(f"{path}: its metadata is not a JSON object")
    return metadata, completed, failures, rows


# ---------------------------------------------------------------------------------------------- running


@dataclass
class EmbedSummary:
    """What an embed run did and what its output now holds."""

    output: str
    format: str
    rows: int = 0
    embedded: int = 0
    files: int = 0
    skipped_files: int = 0
    frames: int = 0
    dim: int = 0
    seconds: float = 0.0
    resumed: bool = False
    failures: list[list[str]] = field(default_factory=list)
    stats: StreamStats | None = None
    aligner: str = ""
    lowest_score: float | None = None  # the least confident face embedded in this run (DFA: reject below it)

    def to_dict(self) -> dict:
        rate = self.files / self.seconds if self.seconds > 0 else None
        return {
            "output": self.output,
            "format": self.format,
            "embedded": self.embedded,
            "rows": self.rows,
            "files": self.files,
            "skipped_files": self.skipped_files,
            "frames": self.frames,
            "batches": 0 if self.stats is None else self.stats.batches,
            "dim": self.dim,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "files_per_second": None if rate is None else round(rate, 3),
            "aligner": self.aligner,
            "lowest_score": self.lowest_score,
            "failures": [{"file": file, "reason": reason} for file, reason in self.failures],
        }


def embed_settings(pipeline, embedder, *, fps: float, segment_frames: int = SEGMENT_FRAMES) -> dict:
    """The options that change the rows: a run continues an output only when these are equal."""
    return {
        "model_fingerprint": embedder.fingerprint,
        "output_dim": int(embedder.output_dim),
        "num_keypoints": int(embedder.num_keypoints),
        "flip": bool(embedder.flip),
        "pipeline": pipeline.describe(),
        "fps": float(fps),
        "segment_frames": int(segment_frames),
    }


def embed_to_output(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    pipeline,
    embedder,
    fps: float = DEFAULT_FPS,
    workers: int | None = 0,
    pipeline_factory: Callable | None = None,
    overwrite: bool = False,
    shard_rows: int = SHARD_ROWS,
    shard_seconds: float = SHARD_SECONDS,
    progress: bool = True,
    info: dict | None = None,
    on_failure: Callable[[str, str], None] | None = None,
    runner: Runner | None = None,
) -> EmbedSummary:
    """Embed every face of ``inputs`` into ``output`` (see the module notes for the formats), continuing an
    earlier run of the same model and options. ``on_failure(file, reason)`` is called as failures happen;
    all failures of the output are in the summary (failed inputs are not retried; ``overwrite`` starts
    afresh). ``runner``: run the tasks elsewhere (:class:`kprpe.streaming.ray_data.RayRunner`); the output
    is written here, the same either way."""
    if shard_rows <= 0:
        raise EmbedOutputError(f"--shard-rows must be positive, got {shard_rows}")
    output = Path(output)
    paths = expand_media_paths(inputs)  # before touching the output: a bad input list changes nothing
    settings = embed_settings(pipeline, embedder, fps=fps)
    info = {"kprpe": _version(), **(info or {})}
    started = time.perf_counter()
    single = output.suffix.lower() == ".npz"
    base: tuple[dict, list, list, int] | None = None
    if single:
        if output.is_dir():
            raise EmbedOutputError(f"output {output} is a folder; an .npz output must be a file")
        if output.exists() and not overwrite:
            base = _read_final_npz(output)
            metadata, entries, _, _ = base
            if "settings" not in metadata or entries is None:
                _check_settings(
                    output,
                    {"model_fingerprint": metadata.get("model_fingerprint")},
                    {"model_fingerprint": settings["model_fingerprint"]},
                )
                raise EmbedOutputError(
                    f"{output} was written by an earlier kprpe without resume information; pass --overwrite "
                    "to replace it, or write to a new output"
                )
            _check_settings(output, metadata["settings"], settings)
        elif output.exists():
            _read_final_npz(output)  # --overwrite replaces our own file, never a stranger's
        folder = output.parent / f".{output.name}.parts"
        base_stamp = _stamp(output) if base is not None else None
        store = ShardFolder.open(
            folder,
            settings,
            shard_format="npz",
            overwrite=overwrite,
            info={**info, "base": base_stamp},
            label=str(output),
        )
        if store.header.get("base") != base_stamp:  # staged against another version of the .npz
            store.remove()
            store = ShardFolder.open(
                folder, settings, shard_format="npz", info={**info, "base": base_stamp}, label=str(output)
            )
    else:
        wanted = "parquet" if output.suffix.lower() == ".parquet" else "auto"
        store = ShardFolder.open(output, settings, shard_format=wanted, overwrite=overwrite, info=info)
    completed = Completed()
    base_rows = 0
    if base is not None:
        metadata, entries, base_failures, base_rows = base
        _completed_from([{"tasks": entries, "failures": base_failures, "rows": base_rows}], completed)
    earlier_rows, earlier_failures = _completed_from(
        (manifest for _, manifest in store.manifests()), completed
    )
    resumed = bool(base is not None or store.shards())
    skipped = sum(1 for path in paths if completed.file_done(path))
    stats = StreamStats()
    buffered: list[EmbeddedTask] = []
    new_failures: list[list[str]] = []
    committed = len(store.shards())
    last_commit = time.monotonic()
    buffered_rows = 0

    def commit() -> None:
        nonlocal committed, last_commit, buffered_rows
        if buffered:
            store.commit(buffered)
            buffered.clear()
            committed += 1
        buffered_rows, last_commit = 0, time.monotonic()

    ok = False
    stream = stream_embeddings(
        paths,
        pipeline=pipeline,
        embedder=embedder,
        fps=fps,
        workers=workers,
        pipeline_factory=pipeline_factory,
        completed=completed,
        progress=progress,
        stats=stats,
        paths=paths,
        runner=runner,
    )
    lowest = math.inf
    try:
        for done in stream:
            buffered.append(done)
            for row in done.rows:
                if math.isfinite(row.score):
                    lowest = min(lowest, row.score)
            if done.failure is not None:
                new_failures.append([done.task.path, done.failure])
                if on_failure is not None:
                    on_failure(done.task.path, done.failure)
            buffered_rows += len(done.rows)
            if (
                buffered_rows >= shard_rows
                or len(buffered) >= shard_rows
                or time.monotonic() - last_commit >= shard_seconds
            ):
                commit()
        ok = True
    finally:
        stream.close()
        if not ok:
            with contextlib.suppress(Exception):  # keep the finished tasks of an interrupted run
                commit()
            if committed == 0 and store.created:
                store.remove()
            else:
                store.close()
    commit()
    total_rows = base_rows + earlier_rows + stats.faces
    failures = (base[2] if base is not None else []) + earlier_failures + new_failures
    summary = EmbedSummary(
        output=str(output),
        format="npz" if single else f"{store.shard_format} shards",
        rows=total_rows,
        embedded=stats.faces,
        files=stats.files,
        skipped_files=skipped,
        frames=stats.frames,
        dim=int(embedder.output_dim),
        resumed=resumed,
        failures=failures,
        stats=stats,
        aligner=str(getattr(getattr(pipeline, "detector", None), "name", "")),
        lowest_score=None if lowest == math.inf else float(lowest),
    )
    if single:
        _finish_npz(output, store, base, settings, info, failures, total_rows)
    else:
        store.header.update(rows=total_rows, failures=failures)
        atomic_write_text(store.folder / HEADER, json.dumps(store.header, indent=2) + "\n")
        store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _finish_npz(
    output: Path, store: ShardFolder, base, settings: dict, info: dict, failures: list, rows: int
) -> None:
    shapes = store._shapes()
    sources: list[Callable[[list[str]], dict]] = []
    entries: list = []
    if base is not None:
        sources.append(lambda names: _read_npz_columns(output, names))
        entries.extend(base[1])
    for shard, manifest in store.manifests():
        sources.append(lambda names, shard=shard: store.columns(shard, names))
        entries.extend(manifest["tasks"])
    metadata = {
        "format": EMBED_FORMAT,
        "weights": info.get("weights"),
        "model_fingerprint": settings["model_fingerprint"],
        "flip": settings["flip"],
        "pipeline": settings["pipeline"],
        "settings": settings,
        "kprpe": info.get("kprpe"),
    }
    extra = {
        "failures": np.asarray(failures, dtype=str).reshape(-1, 2),
        "completed": np.asarray([json.dumps(entry) for entry in entries], dtype=str).reshape(-1),
        "metadata": np.asarray(json.dumps(metadata)),
    }
    _npz_write_streaming(output, sources, rows, shapes, extra)
    store.remove()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kprpe")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "unknown"


# ---------------------------------------------------------------------------------------------- reading


def read_embeddings(path: str | os.PathLike) -> dict:
    """Everything an embed output holds, whatever its kind: the columns (canonical names, numpy arrays),
    ``failures`` (list of ``[file, reason]``) and ``settings``. Loads it all: for very large outputs read
    the Parquet shards with pyarrow directly."""
    path = Path(path)
    if path.is_file():
        metadata, _, failures, _ = _read_final_npz(path)
        columns = _read_npz_columns(path, COLUMNS)
        return {**columns, "failures": failures, "settings": metadata.get("settings", {})}
    header_path = path / HEADER
    if not header_path.is_file():
        raise EmbedOutputError(f"{path}: not a kprpe embed output (no {HEADER})")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    store = ShardFolder(path, header.get("shard_format", "npz"), header)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    failures: list = []
    for shard, manifest in store.manifests():
        failures.extend(manifest.get("failures", []))
        for name, values in store.columns(shard, COLUMNS).items():
            parts[name].append(values)
    shapes = store._shapes()
    columns = {}
    for name, chunks in parts.items():
        if chunks:
            columns[name] = (
                np.concatenate(chunks)
                if name not in _STRING_COLUMNS
                else np.asarray([v for chunk in chunks for v in chunk.tolist()], dtype=str).reshape(-1)
            )
        else:
            dtype = str if name in _STRING_COLUMNS else _DTYPES[name]
            columns[name] = np.zeros((0, *shapes.get(name, ())), dtype=dtype)
    return {**columns, "failures": failures, "settings": header.get("settings", {})}
