"""Streaming embedding: photos and videos -> detection and alignment in worker processes -> batched model
calls, in input order, with memory bounded by the batch size instead of the number of inputs.

Task-neutral: the pipeline that finds and crops what is embedded is passed in (the face pipeline today; see
:func:`run_task` for what it must offer), so rows are called faces but hold any detection.

The unit of work is a :class:`Task`: one photo, or one segment of a video (``SEGMENT_FRAMES`` sampled
frames, see :mod:`.video`). Workers turn tasks into face crops; the main process keeps a few tasks
in flight, embeds the crops ``batch_size`` at a time and hands back each task once all its faces are
embedded (:class:`EmbeddedTask`, crops dropped). Crops alive at once: at most one batch plus the faces of
the tasks in flight — never the folder. :class:`Completed` says which tasks an earlier run finished, so a
resumed run skips exactly those.

>>> for done in stream_embeddings(["photos/", "clip.mp4"], pipeline=pipeline, embedder=embedder, workers=2):
...     done.rows[0].embedding, done.failure
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import KprpeError
from ..images import ImageLoadError, expand_image_paths, load_image
from ..workers import exit_with_parent
from .video import VIDEO_EXTENSIONS, SegmentEnd, VideoError, is_video_path, sample_frames

__all__ = [
    "DEFAULT_FPS",
    "SEGMENT_FRAMES",
    "STILL",
    "Completed",
    "EmbeddedTask",
    "FaceRow",
    "NonFiniteEmbeddingError",
    "StreamError",
    "StreamStats",
    "Task",
    "TaskResult",
    "TaskSource",
    "WorkerStartError",
    "default_workers",
    "error_text",
    "expand_media_paths",
    "file_key",
    "resolve_workers",
    "iter_embedded",
    "iter_task_results",
    "run_task",
    "single_threaded",
    "stream_embeddings",
]

DEFAULT_FPS = 1.0
SEGMENT_FRAMES = 16  # sampled frames per video task: bounds a task's crops, sets the resume granularity
STILL = -1  # the segment number of a photo


class StreamError(KprpeError, ValueError):
    """Options a streaming run cannot work with (the message names the option)."""


class NonFiniteEmbeddingError(StreamError):
    """The model returned NaN or infinite embeddings (broken weights); nothing of that batch is kept."""


class WorkerStartError(KprpeError, RuntimeError):
    """A worker process could not build its face pipeline (the reason is the worker's error message)."""


def default_workers() -> int:
    """Worker processes when none are asked for: one per core but one (for the model), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


AUTO_WORKERS_MIN_FILES = 32  # below this, starting worker processes (seconds each) costs more than it saves


def resolve_workers(workers: int | None, paths: list[Path]) -> int:
    """``None`` (auto): in-process for a handful of photos, else :func:`default_workers`; a video counts as
    many photos."""
    if workers is not None:
        if workers < 0:
            raise StreamError(f"--workers must be >= 0, got {workers}")
        return int(workers)
    weight = sum(AUTO_WORKERS_MIN_FILES if is_video_path(path) else 1 for path in paths)
    return default_workers() if weight >= AUTO_WORKERS_MIN_FILES else 0


def file_key(path: str | os.PathLike) -> str:
    """What a resumed run matches inputs on: the absolute path (the same file typed differently is one)."""
    return os.path.abspath(os.fspath(path))


def expand_media_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Like :func:`kprpe.images.expand_image_paths`, but folders also give their video files; duplicates
    (the same file named twice) are dropped, the first kept."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            videos = [
                child
                for child in path.iterdir()
                if child.is_file()
                and not child.name.startswith(".")
                and child.suffix.lower() in VIDEO_EXTENSIONS
            ]
            try:
                images = expand_image_paths([path])
            except ImageLoadError:
                if not videos:
                    raise
                images = []
            found.extend(sorted([*images, *videos]))
        else:
            found.append(path)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(file_key(path), path)
    return list(unique.values())


# ----------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One photo (``segment == STILL``) or one segment of a video; ``key`` is :func:`file_key`."""

    path: str
    key: str
    segment: int = STILL

    @property
    def is_video(self) -> bool:
        return self.segment != STILL


@dataclass
class FaceRow:
    """One face: where it came from, where it is, and (once embedded) its embedding; ``crop`` is the
    model input and is dropped as soon as the face is embedded."""

    file: str
    name: str
    frame: int
    time: float
    face_index: int
    box: np.ndarray  # (4,) x0, y0, x1, y1 photo pixels (NaN when the backend gives none)
    landmarks: np.ndarray  # (K, 2) keypoints in photo pixels
    keypoints: np.ndarray  # (K, 2) keypoints in the crop, divided by 112 (what the model reads)
    score: float  # detector score (NaN when the backend gives none)
    crop: np.ndarray | None = None
    pixels: np.ndarray | None = None  # the aligner's own float crop (DFA), embedded exactly when present
    embedding: np.ndarray | None = None
    norm: float = math.nan


@dataclass
class TaskResult:
    """What a worker made of a task: face rows (with crops), or a failure reason, or both (a video that
    broke after some frames). ``end``: the video has nothing after this segment. ``frames``: frames
    sampled."""

    task: Task
    rows: list[FaceRow] = field(default_factory=list)
    failure: str | None = None
    end: bool = True
    frames: int = 1
    next_segment: int | None = None  # video: the segment of the next frame (segments before it are empty)


# A task handed back with every face embedded has the same fields.
EmbeddedTask = TaskResult


def _face_rows(faces, *, file: str, name: str, frame: int, time: float, all_faces: bool) -> list[FaceRow]:
    rows = []
    for index, face in enumerate(faces):
        box = np.full(4, np.nan, np.float32) if face.box is None else np.asarray(face.box, np.float32)
        rows.append(
            FaceRow(
                file=file,
                name=name if index == 0 and not all_faces else f"{name}#{index}",
                frame=frame,
                time=time,
                face_index=index,
                box=box,
                landmarks=np.asarray(face.source_keypoints, np.float32),
                keypoints=np.asarray(face.keypoints, np.float32),
                score=math.nan if face.score is None else float(face.score),
                crop=face.image,
                pixels=getattr(face, "pixels", None),
            )
        )
    return rows


def run_task(
    task: Task, pipeline, *, fps: float = DEFAULT_FPS, segment_frames: int = SEGMENT_FRAMES
) -> TaskResult:
    """Detect and align the faces of one task. Problems with the file become ``failure``, never an
    exception: one bad file must not stop a run over thousands.

    ``pipeline``: any object with ``faces_in_image(image, source=...)`` returning detections (``box``,
    ``source_keypoints``, ``keypoints``, ``score``, ``image``, optional ``pixels``) and ``skip_errors``, the
    exceptions that mean "nothing usable in this image" (a face pipeline: no face found; a gait pipeline: no
    person). Nothing here knows what is detected."""
    skippable = tuple(getattr(pipeline, "skip_errors", ()))
    all_faces = bool(getattr(pipeline, "all_faces", False))
    if not task.is_video:
        try:
            image = load_image(task.path)
            faces = pipeline.faces_in_image(image, source=task.path)
        except ImageLoadError as exc:
            return TaskResult(task, failure=exc.reason)
        except skippable as exc:
            return TaskResult(task, failure=str(exc))
        except Exception as exc:  # a library choking on one odd file: report it, keep going
            return TaskResult(task, failure=f"{type(exc).__name__}: {exc}")
        return TaskResult(
            task, _face_rows(faces, file=task.path, name=task.path, frame=0, time=0.0, all_faces=all_faces)
        )
    status = SegmentEnd()
    rows: list[FaceRow] = []
    frames = 0
    try:
        for frame in sample_frames(
            task.path, fps=fps, segment=task.segment, segment_frames=segment_frames, status=status
        ):
            frames += 1
            try:
                faces = pipeline.faces_in_image(frame.image, source=f"{task.path}@{frame.number}")
            except skippable:  # frames without a (usable) face are normal in video
                continue
            rows.extend(
                _face_rows(
                    faces,
                    file=task.path,
                    name=f"{task.path}@{frame.number}",
                    frame=frame.number,
                    time=frame.time,
                    all_faces=all_faces,
                )
            )
    except VideoError as exc:
        return TaskResult(task, rows, failure=exc.reason, end=True, frames=frames)
    except Exception as exc:
        return TaskResult(task, rows, failure=f"{type(exc).__name__}: {exc}", end=True, frames=frames)
    return TaskResult(task, rows, end=status.end, frames=frames, next_segment=status.next_segment)


# ------------------------------------------------------------------------------------- what is done


@dataclass
class Completed:
    """Tasks finished by earlier runs into the same output (what a resumed run skips)."""

    stills: set[str] = field(default_factory=set)
    segments: dict[str, set[int]] = field(default_factory=dict)
    video_end: dict[str, int] = field(default_factory=dict)  # video key -> the segment where it ended
    video_rows: dict[str, int] = field(default_factory=dict)
    video_frames: dict[str, int] = field(default_factory=dict)
    # video key -> {segment: the segment of the next frame}, for segments followed by empty ones (a time gap)
    jumps: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(
        self, key: str, segment: int, rows: int, end: bool, frames: int, next_segment: int | None = None
    ) -> None:
        if segment == STILL:
            self.stills.add(key)
            return
        self.segments.setdefault(key, set()).add(segment)
        if next_segment is not None and next_segment > segment + 1:
            self.jumps.setdefault(key, {})[segment] = next_segment
        self.video_rows[key] = self.video_rows.get(key, 0) + rows
        self.video_frames[key] = self.video_frames.get(key, 0) + frames
        if end:
            self.video_end[key] = min(segment, self.video_end.get(key, segment))

    def subset(self, keys: Iterable[str]) -> Completed:
        """What is known about these files' videos only (what a worker elsewhere needs to resume them)."""
        part = Completed()
        for key in keys:
            for name in ("segments", "video_end", "video_rows", "video_frames", "jumps"):
                if key in getattr(self, name):
                    getattr(part, name)[key] = copy.deepcopy(getattr(self, name)[key])
        return part

    def file_done(self, path: str | os.PathLike) -> bool:
        key = file_key(path)
        if not is_video_path(path):
            return key in self.stills
        end = self.video_end.get(key)
        if end is None:
            return False
        done, jumps = self.segments.get(key, set()), self.jumps.get(key, {})
        segment = 0
        while segment <= end:  # every segment read, stepping over the empty ones a gap left out
            if segment not in done:
                return False
            segment = max(segment + 1, jumps.get(segment, 0))
        return True


class TaskSource:
    """Tasks in input order: each photo, then each video segment until the video's end is known.
    Internal to the streaming package (the local worker loop and :mod:`.ray_data` replay it)."""

    def __init__(self, paths: list[Path], completed: Completed) -> None:
        self._files = iter(paths)
        self._completed = completed
        self._video: tuple[str, str, int] | None = None
        self.ended: dict[str, int] = dict(completed.video_end)
        # video key -> (last segment before, first after) the latest gap a result revealed; results come in
        # order, so every task inside an earlier gap has come back before a later gap replaces it
        self._gap: dict[str, tuple[int, int]] = {}

    def skip_to(self, key: str, segment: int | None) -> None:
        """The segments of ``key`` before ``segment`` hold no frame (a gap in the timestamps): skip them."""
        if segment is not None and self._video is not None and self._video[0] == key:
            self._video = (key, self._video[1], max(self._video[2], segment))

    def record(self, result: TaskResult) -> None:
        """What a video task found out: that the video ends there, or where its next frame lies."""
        task = result.task
        if not task.is_video:
            return
        if result.end:
            self.ended[task.key] = task.segment
            return
        if result.next_segment is not None and result.next_segment > task.segment + 1:
            self._gap[task.key] = (task.segment, result.next_segment)
        self.skip_to(task.key, result.next_segment)

    def stepped_over(self, task: Task) -> bool:
        """A task asked for before an earlier result was known that the in-process path never runs: a
        segment past its video's end, or inside a time gap. Worker processes run tasks ahead, so these come
        back (empty); recording them would make the manifests depend on how many were in flight. Not
        recording them loses nothing: a resumed run steps over a gap by the jump recorded on the segment
        before it, so the gap's segments are never read again."""
        if not task.is_video:
            return False
        end = self.ended.get(task.key)
        if end is not None and task.segment > end:
            return True
        before, after = self._gap.get(task.key, (0, 0))
        return before < task.segment < after

    def next(self) -> Task | None:
        while True:
            if self._video is not None:
                key, path, segment = self._video
                end = self.ended.get(key)
                if end is not None and segment > end:
                    self._video = None
                    continue
                self._video = (key, path, segment + 1)
                if segment in self._completed.segments.get(key, ()):
                    # resumed: read on from where that segment's next frame lies
                    self.skip_to(key, self._completed.jumps.get(key, {}).get(segment))
                    continue
                return Task(path, key, segment)
            path = next(self._files, None)
            if path is None:
                return None
            key = file_key(path)
            if is_video_path(path):
                self._video = (key, str(path), 0)
            elif key not in self._completed.stills:
                return Task(str(path), key)


# --------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


class _Given:
    """A pipeline factory that returns a pipeline built elsewhere (pickled to each worker)."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self):
        return self.pipeline


def single_threaded() -> None:
    """One thread for OpenCV and torch: a worker is one of many on the machine's cores."""
    try:
        import cv2

        cv2.setNumThreads(1)
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def error_text(exc: BaseException) -> str:
    """How a worker's error reads in the one-line report (a kprpe error speaks for itself)."""
    return str(exc) if isinstance(exc, KprpeError) else f"{type(exc).__name__}: {exc}"


def _worker_init(factory: Callable, fps: float, segment_frames: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    exit_with_parent()  # ... and a killed main process takes its workers with it
    single_threaded()
    try:
        _WORKER.update(pipeline=factory(), fps=fps, segment_frames=segment_frames, error=None)
    except Exception as exc:  # reported on the first task instead of a pool that restarts workers forever
        _WORKER.update(pipeline=None, error=error_text(exc))


def _worker_run(task: Task) -> TaskResult:
    if _WORKER.get("error"):
        raise WorkerStartError(_WORKER["error"])
    return run_task(task, _WORKER["pipeline"], fps=_WORKER["fps"], segment_frames=_WORKER["segment_frames"])


def iter_task_results(
    paths: list[Path],
    *,
    pipeline,
    fps: float = DEFAULT_FPS,
    segment_frames: int = SEGMENT_FRAMES,
    workers: int = 0,
    pipeline_factory: Callable | None = None,
    completed: Completed | None = None,
) -> Iterator[TaskResult]:
    """Run every task not in ``completed``, in input order. ``workers > 0``: that many processes (spawned,
    so they are safe next to threads of the model) each build their pipeline with ``pipeline_factory`` (a
    picklable callable; default: ``pipeline`` itself is pickled) and at most ``2 * workers`` tasks are in
    flight. ``workers == 0``: in this process, one task at a time."""
    source = TaskSource(paths, completed or Completed())
    if workers <= 0:
        while (task := source.next()) is not None:
            result = run_task(task, pipeline, fps=fps, segment_frames=segment_frames)
            source.record(result)
            yield result
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    factory = pipeline_factory if pipeline_factory is not None else _Given(pipeline)
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(factory, fps, segment_frames),
    )
    pending: deque = deque()
    finished = False
    try:
        while True:
            while len(pending) < 2 * workers and (task := source.next()) is not None:
                pending.append((task, pool.submit(_worker_run, task)))
            if not pending:
                break
            task, handle = pending.popleft()
            try:
                result = handle.result()
            except BrokenProcessPool:  # a worker died: killed for memory, or a crash in a native library
                in_flight = [task.path, *(other.path for other, _ in pending)]
                raise StreamError(
                    f"a worker process died while working on one of {sorted(set(in_flight))[:5]} (out of "
                    "memory, a crash in a native library, or a script without an `if __name__ == "
                    "'__main__':` guard: workers import the main module); what was finished before is kept — "
                    "re-run to continue, or use --workers 0"
                ) from None
            if source.stepped_over(task):  # past the video's end or inside a gap: as if never run
                continue
            source.record(result)
            yield result
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


# ------------------------------------------------------------------------------------------- embedding


# Runs the tasks of the files still to do elsewhere: (todo, completed, stats) -> embedded tasks, in order.
Runner = Callable[[list[Path], "Completed", "StreamStats"], Iterator[EmbeddedTask]]


@dataclass
class StreamStats:
    """What a run did, and the most crops it held at once (the bound the streaming design promises)."""

    tasks: int = 0
    files: int = 0
    frames: int = 0
    faces: int = 0
    batches: int = 0
    peak_buffered_faces: int = 0


def _embed_rows(rows: list[FaceRow], embedder) -> None:
    if any(row.pixels is not None for row in rows):  # the DFA's float crops: the official pipeline, exactly
        faces = [SimpleNamespace(image=row.crop, keypoints=row.keypoints, pixels=row.pixels) for row in rows]
        unit, norms = embedder.embed_faces(faces)
    else:
        crops = np.stack([row.crop for row in rows])
        keypoints = np.stack([row.keypoints for row in rows]).astype(np.float32)
        unit, norms = embedder.embed_crops(crops, keypoints)
    finite = np.isfinite(unit).all(axis=1) & np.isfinite(norms)
    if not finite.all():
        raise NonFiniteEmbeddingError(
            f"the model produced non-finite embeddings ({int((~finite).sum())} of {len(rows)} in the batch "
            f"starting at {rows[0].name}); the checkpoint is broken (did its training diverge?) — "
            "this batch was not written"
        )
    for row, vector, norm in zip(rows, unit, norms, strict=True):
        row.embedding, row.norm, row.crop, row.pixels = vector, float(norm), None, None


def iter_embedded(
    results: Iterable[TaskResult], embedder, *, stats: StreamStats | None = None
) -> Iterator[EmbeddedTask]:
    """Embed the crops of ``results`` ``embedder.batch_size`` at a time; yield each task, in order, once all
    its faces are embedded (crops dropped)."""
    stats = stats if stats is not None else StreamStats()
    batch_size = int(embedder.batch_size)
    open_tasks: deque[TaskResult] = deque()
    waiting: list[FaceRow] = []

    def finished() -> Iterator[EmbeddedTask]:
        while open_tasks and (not open_tasks[0].rows or open_tasks[0].rows[-1].embedding is not None):
            yield open_tasks.popleft()

    for result in results:
        open_tasks.append(result)
        waiting.extend(result.rows)
        stats.peak_buffered_faces = max(stats.peak_buffered_faces, len(waiting))
        while len(waiting) >= batch_size:
            _embed_rows(waiting[:batch_size], embedder)
            del waiting[:batch_size]
            stats.batches += 1
        if waiting and len(open_tasks) > 4 * batch_size:  # a long run of faceless inputs behind a few faces
            _embed_rows(waiting, embedder)
            waiting.clear()
            stats.batches += 1
        yield from finished()
    if waiting:
        _embed_rows(waiting, embedder)
        stats.batches += 1
    yield from finished()


def stream_embeddings(
    inputs: Iterable[str | os.PathLike],
    *,
    pipeline,
    embedder,
    fps: float = DEFAULT_FPS,
    segment_frames: int = SEGMENT_FRAMES,
    workers: int | None = 0,
    pipeline_factory: Callable | None = None,
    completed: Completed | None = None,
    progress: bool = True,
    stats: StreamStats | None = None,
    paths: list[Path] | None = None,
    runner: Runner | None = None,
) -> Iterator[EmbeddedTask]:
    """Photos and videos (files or folders) -> embedded tasks in input order (see the module notes).

    A video in which no sampled frame had a usable face gets a failure on its last segment, as a photo
    without a face does. ``completed``: tasks to skip (a resumed run). ``workers``: processes for decoding,
    detection and alignment (0: in this process; None: :func:`resolve_workers` decides). ``runner``: who
    runs the tasks instead of this machine (:class:`kprpe.streaming.ray_data.RayRunner`); it is called with
    the files still to do, ``completed`` and ``stats`` and yields their embedded tasks in input order.
    """
    if not fps > 0 or not math.isfinite(fps):
        raise StreamError(f"--fps must be a positive number of frames per second, got {fps}")
    completed = completed if completed is not None else Completed()
    stats = stats if stats is not None else StreamStats()
    paths = expand_media_paths(inputs) if paths is None else paths
    todo = [path for path in paths if not completed.file_done(path)]
    video_rows = dict(completed.video_rows)
    video_frames = dict(completed.video_frames)
    if runner is None:
        results = iter_task_results(
            todo,
            pipeline=pipeline,
            fps=fps,
            segment_frames=segment_frames,
            workers=resolve_workers(workers, todo),
            pipeline_factory=pipeline_factory,
            completed=completed,
        )
        embedded = iter_embedded(results, embedder, stats=stats)
    else:
        embedded = results = runner(todo, completed, stats)  # a generator: closing it ends the job
    from tqdm.auto import tqdm  # here, not at the top: `kprpe --help` reads this module's defaults

    bar = tqdm(
        total=len(todo), desc="embed", unit="file", disable=None if progress else True, file=sys.stderr
    )
    try:
        for done in embedded:
            stats.tasks += 1
            stats.frames += done.frames
            stats.faces += len(done.rows)
            if done.task.is_video:
                key = done.task.key
                video_rows[key] = video_rows.get(key, 0) + len(done.rows)
                video_frames[key] = video_frames.get(key, 0) + done.frames
                if done.end and not video_rows[key] and done.failure is None:
                    done.failure = (
                        f"no face found in any of {video_frames[key]} frames sampled at {fps:g} fps"
                    )
            if done.end or not done.task.is_video:
                stats.files += 1
                bar.update(1)
                bar.set_postfix(faces=stats.faces, refresh=False)
            yield done
    finally:
        embedded.close()
        results.close()  # stops the worker processes now, not when the garbage collector gets to them
        bar.close()
