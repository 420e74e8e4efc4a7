"""The embedding stream on Ray Data: the same tasks, run by the same code, on the cores of many machines.

``kprpe embed --ray [ADDRESS]`` hands :func:`kprpe.streaming.stream.stream_embeddings` a :class:`RayRunner`
instead of its worker processes. The work still to do becomes a Ray Dataset of units (:func:`plan_units`: a
photo, or one segment of a video, so a long video is spread over the actors); a pool of actors each builds
the pipeline and loads the model once, then runs the local path's own code on a few units per call
(:func:`~kprpe.streaming.stream.run_task` / :func:`~kprpe.streaming.stream.iter_task_results` in the
actor's process, then :func:`~kprpe.streaming.stream.iter_embedded`). The embedded tasks come back to this
process in input order, the tasks a local run would not have (segments past a video's end or inside a time
gap) are dropped, and the rest are written by the same :class:`~kprpe.streaming.shards.ShardFolder` as a
local run: same shards, same manifests, same resume, same failures.

What is identical to a local run: every row, in the same order, with the same detections bit for bit; the
embeddings to float32 rounding, because the model sees other batches (a matrix product's sums are split
differently for another batch size; see docs/face.md). Inputs (and weights) must be at the same path on every
machine of a cluster (a shared file system); the output is written by this process only.

Ray is imported here only, when a job runs: ``import kprpe`` and a local ``kprpe embed`` never load it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from .stream import (
    DEFAULT_FPS,
    SEGMENT_FRAMES,
    STILL,
    Completed,
    EmbeddedTask,
    StreamError,
    StreamStats,
    Task,
    TaskResult,
    TaskSource,
    WorkerStartError,
    error_text,
    file_key,
    iter_embedded,
    iter_task_results,
    run_task,
    single_threaded,
)
from .video import is_video_path, segment_count

__all__ = ["RAY_EXTRA_HINT", "RayJobError", "RayRunner", "import_ray", "ray_session"]

RAY_EXTRA_HINT = "install the optional extra: pip install 'kprpe[ray]'"
LOCAL = None  # the address of a Ray started on this machine for the job
MAX_SPLIT = 1024  # units per video at most (16384 sampled frames by default); the last one reads on


class RayJobError(StreamError):
    """Ray is missing, cannot be reached, or its job failed (the message says which, in one line)."""


def import_ray():
    """``ray`` with Ray Data, or a one-line error naming the extra that installs them."""
    try:
        import ray
        import ray.data  # noqa: F401 - the part the job needs (the `ray[data]` extra)
    except ImportError as exc:
        raise RayJobError(f"--ray needs Ray Data ({exc}); {RAY_EXTRA_HINT}") from None
    return ray


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


CONNECT_SECONDS = 10.0  # a Ray head answers a TCP connect at once; Ray itself would retry for minutes


def _check_reachable(address: str) -> None:
    """A TCP connect to HOST:PORT first: ``ray.init`` retries an address nobody listens on for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise RayJobError(
            f"cannot reach Ray at {address!r} ({exc.strerror or type(exc).__name__}); is a Ray cluster "
            "running there (`ray start --head` prints its address)?"
        ) from None


def check_address(address: str | None, *, connect: bool = False) -> None:
    """Refuse what cannot be a Ray address before Ray spends minutes on it: most often an input that
    ``--ray`` took as its ADDRESS (``kprpe embed --ray photos/ ...``); ``connect``: also one nobody
    answers at."""
    if address is LOCAL or address == "auto" or address.startswith("anyscale://"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if os.path.exists(address) or not host or not port.isdigit():
        raise RayJobError(
            f"--ray {address!r} is not a Ray address (auto, HOST:PORT or ray://HOST:PORT); to start a local "
            "Ray, put --ray after the inputs or write --ray= with no address"
        )
    if connect:
        _check_reachable(address)


@contextlib.contextmanager
def ray_session(address: str | None = LOCAL, *, workers: int | None = None) -> Iterator[object]:
    """Ray for one job: a Ray this process already started is used as it is; else a local Ray with
    ``workers`` CPUs (``address`` None), or the cluster at ``address``; shut down afterwards."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    check_address(address, connect=True)
    try:
        ray.init(
            address=address,
            num_cpus=workers if address is LOCAL else None,
            include_dashboard=False,
            log_to_driver=False,  # actors' logs stay in Ray's log folder, not on this command's stderr
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except Exception as exc:  # ConnectionError, TimeoutError, ValueError... all mean "no Ray there"
        where = "a local Ray" if address is LOCAL else f"Ray at {address!r}"
        raise RayJobError(f"cannot start or reach {where}: {_first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


class _EmbedActor:
    """One Ray actor: builds the pipeline and loads the model once, then embeds a few units per call."""

    def __init__(self, pipeline_factory, embedder_factory, fps, segment_frames, completed, cwd) -> None:
        single_threaded()  # one CPU per actor: Ray schedules as many actors as there are CPUs
        if os.path.isdir(cwd):  # relative inputs (and the rows that name them) read as on the command line
            os.chdir(cwd)
        self.fps, self.segment_frames, self.completed = fps, segment_frames, completed
        try:
            self.pipeline, self.embedder, self.error = pipeline_factory(), embedder_factory(), None
        except Exception as exc:  # reported with the first call, in one line, instead of a restart loop
            self.error = error_text(exc)

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:  # a value, not an exception: Ray would wrap it in pages of traceback
            return {
                "task": np.full(1, None, dtype=object),
                "start_error": np.asarray([self.error]),
                "batches": np.zeros(1, np.int64),
                "peak_faces": np.zeros(1, np.int64),
            }
        units = zip(batch["path"], batch["segment"], batch["read_on"], strict=True)
        results = itertools.chain.from_iterable(self._results(str(p), int(s), bool(r)) for p, s, r in units)
        stats = StreamStats()
        done = list(iter_embedded(results, self.embedder, stats=stats))
        tasks = np.empty(len(done), dtype=object)  # Ray carries the (small, crop-free) tasks as objects
        tasks[:] = done
        # this call's model batches ride on its first row (columns are per row), so the driver's sum is exact
        batches = np.zeros(len(done), np.int64)
        peak = np.zeros(len(done), np.int64)
        if len(done):
            batches[0], peak[0] = stats.batches, stats.peak_buffered_faces
        return {"task": tasks, "start_error": np.full(len(done), ""), "batches": batches, "peak_faces": peak}

    def _results(self, path: str, segment: int, read_on: bool) -> Iterator[TaskResult]:
        """The tasks of one unit: a photo; one segment of a video; or (``read_on``) a video from ``segment``
        to its end, as the local path reads it (resumed segments skipped, time gaps stepped over)."""
        if segment == STILL or read_on:
            completed = self.completed
            if segment > 0:  # the segments before are other units': as if done
                completed = self.completed.subset([file_key(path)])
                completed.segments.setdefault(file_key(path), set()).update(range(segment))
            yield from iter_task_results(
                [Path(path)],
                pipeline=self.pipeline,
                fps=self.fps,
                segment_frames=self.segment_frames,
                completed=completed,
            )
        else:
            task = Task(path, file_key(path), segment)
            yield run_task(task, self.pipeline, fps=self.fps, segment_frames=self.segment_frames)


def plan_units(
    todo: list[Path], completed: Completed, *, fps: float, segment_frames: int
) -> list[tuple[str, int, bool]]:
    """The work units of ``todo``, in input order: ``(path, segment, read_on)``. A photo is one unit
    (segment STILL); a video is one unit per segment its header's duration implies (those not already
    done), the last reading on to the real end (``read_on``: the header may be short). A video whose
    header gives no duration is one unit, read from the start as before."""
    units: list[tuple[str, int, bool]] = []
    for path in todo:
        if not is_video_path(path):
            units.append((str(path), STILL, False))
            continue
        count = segment_count(path, fps=fps, segment_frames=segment_frames) or 1
        last = min(count, MAX_SPLIT) - 1
        done = completed.segments.get(file_key(path), set())
        units.extend((str(path), segment, False) for segment in range(last) if segment not in done)
        units.append((str(path), last, True))
    return units


class _InOrder:
    """Which of the units' tasks a local run would have: the segments of a video are run independently,
    so those past its end (or a failure that ended it) and those inside a time gap come back too, empty or
    past the end: the local path never runs them, so they are dropped here (:class:`TaskSource`, replayed
    with each kept task's outcome, says which task comes next)."""

    def __init__(self, completed: Completed) -> None:
        self.completed = completed
        self.videos: dict[str, tuple[TaskSource, Task | None]] = {}

    def keep(self, done: EmbeddedTask) -> bool:
        task = done.task
        if not task.is_video:
            return True
        if task.key not in self.videos:
            source = TaskSource([Path(task.path)], self.completed)
            self.videos[task.key] = (source, source.next())
        source, expected = self.videos[task.key]
        if expected is None or task.segment < expected.segment:  # past the end, or in a gap stepped over
            return False
        if task.segment > expected.segment:  # would lose frames: a bug, not a bad input
            raise RayJobError(
                f"{task.path}: segment {expected.segment} did not come back from the Ray actors "
                f"(segment {task.segment} did)"
            )
        if done.end:  # the source's own key: the same file, whatever this actor made of its path
            source.ended[expected.key] = task.segment
        else:
            source.skip_to(expected.key, done.next_segment)
        self.videos[task.key] = (source, source.next())
        return True


@dataclass
class RayRunner:
    """Runs the files still to do on Ray (see the module notes); a ``runner`` for ``stream_embeddings``.

    ``pipeline_factory`` and ``embedder_factory`` are picklable callables each actor calls once (the
    detector and the model are built where they run). ``workers``: actors, one CPU each (default: every CPU
    Ray has). ``files_per_call``: units (a photo, a video segment; the name is older than the split) an
    actor embeds per call, its model batches spanning them (default: as many as one model batch, fewer when
    that would leave actors idle). ``num_gpus``: GPUs Ray reserves for each actor (a fraction shares one;
    default 0): the factories must then build on ``"cuda"``, which in an actor is the GPU Ray gave it."""

    pipeline_factory: Callable
    embedder_factory: Callable
    address: str | None = LOCAL
    workers: int | None = None
    batch_size: int = 16
    files_per_call: int | None = None
    fps: float = DEFAULT_FPS
    segment_frames: int = SEGMENT_FRAMES
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers <= 0:
            raise RayJobError(f"--ray-workers must be positive, got {self.workers}")
        gpus = self.num_gpus
        if not (math.isfinite(gpus) and gpus >= 0) or (gpus > 1 and gpus != int(gpus)):
            # Ray's own rule: a fraction shares one GPU, more than one must be whole GPUs
            raise RayJobError(
                f"--ray-gpus must be 0, a fraction of one GPU (e.g. 0.5) or a whole number, got {gpus:g}"
            )
        check_address(self.address, connect=True)  # now, not after the model has loaded

    def __call__(self, todo: list[Path], completed: Completed, stats: StreamStats) -> Iterator[EmbeddedTask]:
        if not todo:
            return
        with ray_session(self.address, workers=self.workers) as ray:
            workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            if self.num_gpus > 0:
                workers = self._gpu_workers(ray, workers)
            units = plan_units(todo, completed, fps=self.fps, segment_frames=self.segment_frames)
            per_call = self.files_per_call or max(1, min(self.batch_size, math.ceil(len(units) / workers)))
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # shards in input order, as a local run
            context.enable_progress_bars = False  # kprpe's own bar counts files
            context.print_on_execution_start = False  # no "Starting execution of Dataset" lines
            items = [{"path": path, "segment": segment, "read_on": on} for path, segment, on in units]
            blocks = math.ceil(len(units) / per_call)
            dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                _EmbedActor,
                fn_constructor_kwargs={
                    "pipeline_factory": self.pipeline_factory,
                    "embedder_factory": self.embedder_factory,
                    "fps": self.fps,
                    "segment_frames": self.segment_frames,
                    "completed": completed.subset(file_key(path) for path in todo),
                    "cwd": os.getcwd(),
                },
                batch_size=per_call,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(workers, math.ceil(len(units) / per_call))),
                num_cpus=1,
                **({"num_gpus": self.num_gpus} if self.num_gpus > 0 else {}),
            )
            batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
            in_order = _InOrder(completed)
            # Ray Data's notes and its multi-page error reports would bury kprpe's one-line report
            data_log = logging.getLogger("ray.data")
            level = data_log.level
            data_log.setLevel(logging.CRITICAL)
            try:
                for batch in batches:
                    if any(batch["start_error"]):
                        error = next(text for text in batch["start_error"] if text)
                        raise WorkerStartError(f"a Ray worker could not start: {error}")
                    stats.batches += int(batch["batches"].sum())
                    peak = int(batch["peak_faces"].max(initial=0))  # per actor: each holds its own crops
                    stats.peak_buffered_faces = max(stats.peak_buffered_faces, peak)
                    yield from (done for done in batch["task"] if in_order.keep(done))
            except (KeyboardInterrupt, GeneratorExit, KprpeError):
                raise
            except Exception as exc:
                raise _job_error(exc) from None
            finally:
                data_log.setLevel(level)
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

    def _gpu_workers(self, ray, workers: int) -> int:
        """Actors that can get ``num_gpus`` each now, checked before the job is submitted: Ray would wait
        forever for a GPU the cluster does not have. ``workers`` given: refused when there are too few;
        else as many as both the CPUs and the GPUs allow."""
        per_node = [
            float(node.get("Resources", {}).get("GPU", 0)) for node in ray.nodes() if node.get("Alive", True)
        ]
        total = float(ray.cluster_resources().get("GPU", 0))
        asked = f"--ray-gpus {self.num_gpus:g}"
        if total <= 0:
            raise RayJobError(
                f"{asked} asks a GPU for each actor, but the Ray cluster has none (ray.cluster_resources() "
                "lists no GPU); leave --ray-gpus out to run on CPUs, or start Ray on nodes with GPUs"
            )
        # an actor's GPUs come from one node; fractions pack per GPU (0.3 -> 3 actors per GPU, not 3.33)
        if self.num_gpus > 1:
            fits = sum(int(gpus // self.num_gpus) for gpus in per_node)
        else:
            fits = sum(int(gpus) * int(1 / self.num_gpus + 1e-9) for gpus in per_node)
        if fits == 0:
            raise RayJobError(
                f"{asked} asks {self.num_gpus:g} GPUs for each actor, but no Ray node has that many "
                f"(the most on one node: {max(per_node, default=0):g})"
            )
        if self.workers is not None and self.workers > fits:
            raise RayJobError(
                f"--ray-workers {self.workers} with {asked} needs GPUs for {self.workers} actors; the Ray "
                f"cluster's GPUs ({total:g}) hold {fits}: give --ray-workers {fits} or less"
            )
        return min(workers, fits)


def _job_error(exc: BaseException) -> RayJobError:
    """Ray carries an actor's error as the text of its traceback inside its own: name the original in one
    line (the full story is in Ray's log folder)."""
    found = re.findall(r"^((?:\w+\.)*\w*(?:Error|Exception|Interrupt)\b.*)$", str(exc), flags=re.M)
    inner = [line for line in found if not line.startswith(("ray.", "RayTaskError", "UserCodeException"))]
    what = inner[0].strip() if inner else _first_line(exc)
    return RayJobError(f"the Ray job failed ({what}); what was finished before is kept — re-run to continue")
