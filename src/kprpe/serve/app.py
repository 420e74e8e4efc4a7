"""The HTTP service: one model, one aligner, an optional gallery index, behind FastAPI.

Endpoints (multipart uploads, JSON answers):

- ``POST /embed``  file ``image`` [, form ``keypoints``]: ``embedding``, ``norm``, ``face`` (box, landmarks,
score)
- ``POST /verify`` files ``a``, ``b`` [, ``keypoints_a``, ``keypoints_b``]: ``similarity``, ``same``,
``threshold``,
  ``threshold_source``, ``faces``
- ``POST /search`` file ``image``, form ``k`` [, ``keypoints``]: ``matches`` (identity, score, same), ``face``
- ``GET /health``: model, aligner, index and limits

Safety: uploads are read from memory only (no name or path from a request is ever used on the file system);
the request body is capped while it streams in (413, chunked bodies included); images are refused by their
header's pixel count before any pixel is decoded (decompression bombs). Time: a connection must send its
request headers within ``read_timeout_s`` and the body within ``read_timeout_s`` after them (else it is
closed, or answered 408); the whole request, body included, has a deadline (504); an idle keep-alive
connection is closed after ``idle_timeout_s``. Admission counts requests, never sockets: at most
``max_concurrent`` requests decode and infer at once, at most ``max_queued`` more wait or stream their body
(the rest get a JSON 503); a request that times out keeps its slot until its worker thread has finished, so
timed-out work never piles up beyond ``max_concurrent``. Detection and the model run under one lock, so one
model instance serves every request safely. Every error is JSON ``{"error": ...}`` with a 4xx (or 503/504)
status.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import KprpeError

__all__ = ["ALIGNERS", "ServeLimits", "FaceService", "RequestError", "decode_upload", "server_config"]

# Formats the service decodes (a short list keeps rarely used, less-tested decoders away from the network).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


class RequestError(KprpeError):
    """A request the service refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost. Bytes are per uploaded file; the whole body may hold two files plus form."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    max_concurrent: int = 2
    max_queued: int = 64
    max_k: int = 100
    read_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise KprpeError(f"serve limit {name} must be positive, got {value}")

    @property
    def max_body_bytes(self) -> int:
        return 2 * self.max_upload_bytes + 64 * 1024

    @property
    def max_in_flight(self) -> int:
        """Requests the server holds at once (working, waiting, or streaming their body in)."""
        return self.max_concurrent + self.max_queued


# ------------------------------------------------------------------------------------------------ decoding


def decode_upload(data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> upright RGB uint8, refusing empty, non-image, oversized and corrupt uploads."""
    from PIL import Image, UnidentifiedImageError

    from ..images import upright_rgb

    if not data:
        raise RequestError(400, f"field {field!r}: empty upload (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own pixel limit is stricter
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise RequestError(
                        413,
                        f"field {field!r}: image is {width}x{height} = {width * height:,} pixels; "
                        f"the limit is {max_pixels:,}",
                    )
                if width == 0 or height == 0:
                    raise RequestError(400, f"field {field!r}: image has no pixels ({width}x{height})")
                return upright_rgb(opened)  # memory: the decoded image + 3 bytes a pixel
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            415, f"field {field!r}: not an image in a supported format ({', '.join(UPLOAD_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"field {field!r}: image too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise RequestError(
            400, f"field {field!r}: corrupt or truncated image ({type(exc).__name__}: {exc})"
        ) from None


# 5 points of two numbers each fit in a few hundred characters; anything far longer is not keypoints.
MAX_KEYPOINTS_TEXT = 4096


def parse_keypoints(text: str | None, *, field: str) -> np.ndarray | None:
    """Form field holding 5 ``[x, y]`` photo-pixel points as JSON, or None when absent."""
    if text is None or not text.strip():
        return None
    expected = f"field {field!r}: expected JSON [[x, y] x 5] in photo pixels"
    if len(text) > MAX_KEYPOINTS_TEXT:  # also keeps deeply nested brackets away from the JSON parser
        raise RequestError(422, f"{expected}, got {len(text):,} characters")
    try:
        points = np.asarray(json.loads(text), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError, RecursionError):
        raise RequestError(422, f"{expected}, got {text[:80]!r}") from None
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise RequestError(422, f"field {field!r}: expected 5 finite [x, y] points, got shape {points.shape}")
    return points


# ------------------------------------------------------------------------------------------------ aligners


def _dlib_aligner(options: dict) -> Callable:
    from ..face.dlib_backend import DlibDetector
    from ..face.pipeline import FacePipeline

    detector = DlibDetector(
        options.get("detector", "hog"),
        options.get("landmark_model", "68"),
        upsample=options.get("upsample", "auto"),
        min_score=options.get("min_score") or 0.0,
    )
    pipeline = FacePipeline(detector, mode=options.get("mode", "aligned"))
    pipeline.detector  # noqa: B018 - load dlib's models now, not on the first request
    return pipeline.faces_in_image


def _dfa_aligner(options: dict) -> Callable:
    from ..face.dfa_backend import load_dfa_backend
    from ..face.pipeline import FacePipeline

    backend = load_dfa_backend(
        options.get("weights"), device=options.get("device", "cpu"), min_score=options.get("min_score")
    )
    return FacePipeline(backend, mode=options.get("mode", "aligned")).faces_in_image


def _supplied_aligner(options: dict) -> Callable:
    def faces_in_image(image: np.ndarray) -> list:
        raise RequestError(
            422,
            "this server uses --landmarks request: send the face's 5 keypoints in the "
            "'keypoints' form field (JSON [[x, y] x 5], photo pixels)",
        )

    return faces_in_image


# name -> factory(options) returning faces_in_image(image) -> [AlignedFace, ...] (largest first).
# A new backend (e.g. DFA) is one entry here.
ALIGNERS: dict[str, Callable[[dict], Callable]] = {
    "dlib": _dlib_aligner,
    "dfa": _dfa_aligner,
    "supplied": _supplied_aligner,
}


def _faces_from_keypoints(image: np.ndarray, keypoints: np.ndarray, mode: str = "aligned") -> list:
    """Crop the face the client located itself (keypoints in the request: no detector runs)."""
    from ..face.landmark_files import SuppliedLandmarks
    from ..face.pipeline import FacePipeline

    return FacePipeline(SuppliedLandmarks.from_arrays({"upload": keypoints}), mode=mode).faces_in_image(
        image, source="upload"
    )


# ------------------------------------------------------------------------------------------------- service


class FaceService:
    """The model, aligner, index and threshold one server uses; :meth:`analyse` is safe from many threads."""

    def __init__(
        self,
        embedder,
        *,
        aligner: str = "dlib",
        aligner_options: dict | None = None,
        index=None,
        threshold: float,
        threshold_source: str,
        index_path=None,
        api_key: str | None = None,
        thumbnails=None,
    ) -> None:
        if aligner not in ALIGNERS:
            raise KprpeError(f"unknown aligner {aligner!r}; choose one of {sorted(ALIGNERS)}")
        self.embedder = embedder
        self.aligner = aligner
        self._faces_in_image = ALIGNERS[aligner](dict(aligner_options or {}))
        self.mode = (aligner_options or {}).get("mode", "aligned")  # also for keypoints sent with a request
        self.index = index
        self.threshold = float(threshold)
        self.threshold_source = threshold_source
        self.index_path = index_path  # enrol/remove save the gallery here (None: memory only)
        self.api_key = api_key or None  # required by the page's write actions (see routes.check_write)
        self.thumbnails = thumbnails  # a kprpe.gallery.thumbnails.ThumbnailStore, or None (none are kept)
        self._lock = threading.Lock()  # dlib and the model are used by one request at a time
        if index is not None:
            index.check_compatible(embedder.fingerprint, embedder.output_dim)

    def analyse(
        self, images: list[tuple[str, np.ndarray, np.ndarray | None]]
    ) -> tuple[list, np.ndarray, np.ndarray]:
        """``[(field, image, keypoints or None)]`` -> largest face of each, unit embeddings, norms."""
        from ..face.align import AlignmentError
        from ..face.detector import NoFaceFound
        from ..landmarks import LandmarkFileError

        with self._lock:
            faces = []
            for field, image, keypoints in images:
                try:
                    found = (
                        _faces_from_keypoints(image, keypoints, self.mode)
                        if keypoints is not None
                        else self._faces_in_image(image)
                    )
                except NoFaceFound as exc:
                    raise RequestError(422, f"field {field!r}: {exc}") from None
                except (AlignmentError, LandmarkFileError) as exc:
                    raise RequestError(422, f"field {field!r}: cannot align the face ({exc})") from None
                faces.append(found[0])
            unit, norms = self.embedder.embed_faces(faces)
        return faces, unit, norms

    def search(self, unit: np.ndarray, k: int) -> list:
        with self._lock:  # enrol/remove change the index under the same lock
            return self.index.search(unit, k)

    def enrol(self, identity: str, unit: np.ndarray, crop: np.ndarray | None = None) -> int:
        """Add one face's embedding to ``identity`` (new or existing) and save the gallery, then keep a
        thumbnail of its ``crop`` (when the service keeps thumbnails); the identity's face count."""
        from ..gallery.search import GalleryIndexError

        with self._lock:
            if self.index is None:
                raise RequestError(400, "this server has no gallery index; start it with --gallery GALLERY")
            try:
                self.index.add({identity: unit})
            except (GalleryIndexError, ValueError) as exc:
                raise RequestError(422, f"cannot enrol {identity!r}: {exc}") from None
            self._save_index()
            if self.thumbnails is not None and crop is not None:
                try:
                    self.thumbnails.add(identity, crop)
                except OSError as exc:  # the enrolment itself is saved; say what is missing
                    raise RequestError(
                        507, f"enrolled {identity!r}, but its thumbnail could not be written ({exc})"
                    ) from None
            return self.index.count(identity)

    def remove(self, identity: str) -> None:
        with self._lock:
            if self.index is None:
                raise RequestError(400, "this server has no gallery index; start it with --gallery GALLERY")
            if identity not in self.index:
                raise RequestError(404, f"identity {identity!r} is not in the gallery")
            self.index.remove([identity])
            self._save_index()
            if self.thumbnails is not None:
                self.thumbnails.remove(identity)

    def kprpe_view(self):
        """The "See KP-RPE" view of the model, or the reason there is none (a string)."""
        if not hasattr(self, "_kprpe_view"):
            from .bias import KprpeView, NotKprpeModel

            try:
                self._kprpe_view = KprpeView.of(self.embedder.model)
            except NotKprpeModel as exc:
                self._kprpe_view = str(exc)
        return self._kprpe_view

    def bias_rows(self, view, keypoints: np.ndarray, query: int, layer: int, head: int | None) -> dict:
        with self._lock:  # the model's modules are shared with the requests that embed
            return view.rows(keypoints, query, layer, head)

    def thumbnail_urls(self, identity: str) -> list[str]:
        """Where the page loads ``identity``'s thumbnails from (no name in the URL: the store's hash key)."""
        if self.thumbnails is None:
            return []
        key = self.thumbnails.key(identity)
        return [f"/gallery/thumbnail/{key}/{n}" for n in self.thumbnails.numbers(identity)]

    @property
    def saved_to(self) -> str | None:
        """Where enrol/remove changes persist: ``"file"``, ``"database"`` (a DatabaseGallery writes each
        change as it is made), or None (an in-memory gallery)."""
        if self.index_path is not None:
            return "file"
        if getattr(self.index, "kind", None) == "database":
            return "database"
        return None

    def _save_index(self) -> None:
        if self.index_path is not None:
            self.index.save(self.index_path)  # atomic: a crash leaves the previous gallery

    def describe(self) -> dict:
        return {
            "aligner": self.aligner,
            "model_fingerprint": self.embedder.fingerprint,
            "output_dim": self.embedder.output_dim,
            "flip": self.embedder.flip,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "index": self.index.describe() if self.index is not None else None,
            "thumbnails": str(self.thumbnails.folder) if self.thumbnails is not None else None,
        }


def crop_data_url(face) -> str:
    """The 112x112 crop the model saw, as a PNG ``data:`` URL (for the page: no file is written)."""
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(face.image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def face_json(face, *, visual: bool = False) -> dict:
    """Box, landmarks and crop keypoints; ``visual`` adds the crop as a PNG data URL (the page asks for it,
    API clients get the compact answer)."""
    extra = {"crop_png": crop_data_url(face)} if visual else {}
    return {
        **extra,
        "box": [float(v) for v in face.box] if face.box is not None else None,
        "landmarks": np.asarray(face.source_keypoints, dtype=np.float64).round(3).tolist(),
        "score": None if face.score is None else float(face.score),
        "crop_keypoints": np.asarray(face.keypoints, dtype=np.float64).round(6).tolist(),
    }


# ----------------------------------------------------------------------------------------------- admission


class _Admission:
    """Counts requests, not sockets: at most ``max_in_flight`` requests are held (:meth:`enter`), and of
    those at most ``max_concurrent`` work at once (:meth:`slot`).

    Blocking work runs through :meth:`_Lease.run` on a pool of ``max_concurrent`` threads. A slot is given
    back when its request has finished *and* its thread has: a request cancelled by its deadline (504) keeps
    the slot until the decode or inference it started ends, so abandoned work never exceeds ``max_concurrent``
    threads (and their memory)."""

    def __init__(self, max_concurrent: int, max_in_flight: int) -> None:
        self.max_concurrent, self.max_in_flight = max_concurrent, max_in_flight
        self.in_flight = 0
        self.executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="kprpe-serve")
        self._semaphore: asyncio.Semaphore | None = None

    def enter(self) -> bool:
        """Hold one more request, or return False when ``max_in_flight`` are already held."""
        if self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    @asynccontextmanager
    async def slot(self):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
        await self._semaphore.acquire()
        lease = _Lease(self._semaphore, self.executor)
        try:
            yield lease
        finally:
            lease.request_done()


class _Lease:
    """One working slot: released once the request is done and no thread it started is still running."""

    def __init__(self, semaphore: asyncio.Semaphore, executor: ThreadPoolExecutor) -> None:
        self._semaphore, self._executor = semaphore, executor
        self._holders = 1  # the request itself, plus one per thread still running

    def _drop(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._semaphore.release()

    def request_done(self) -> None:
        self._drop()

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the slot's thread pool; the slot stays held until it returns."""
        loop = asyncio.get_running_loop()
        job = self._executor.submit(functools.partial(fn, *args, **kwargs))
        self._holders += 1

        def finished(_) -> None:  # in the worker thread when fn ends, or at once if cancelled unstarted
            try:
                loop.call_soon_threadsafe(self._drop)
            except RuntimeError:  # the server has stopped and closed its loop: nothing is left to release
                pass

        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)


class _Refused(KprpeError):
    """The body stream was cut short by the guard (too large, or too slow); internal to the guard, never
    reaches a caller (a KprpeError like every deliberate error, so the CLI would print it as one line)."""


class _RequestGuard:
    """ASGI middleware around the routes: admission by request count, the body size cap (413, Content-Length
    or while a chunked body streams in), the body read timeout (408) and the request deadline, body read
    included (504). When the guard answers instead of the routes, whatever the routes tried to send is
    dropped and the connection is closed (its unread body would otherwise keep it open)."""

    def __init__(self, app, limits: ServeLimits, admission: _Admission) -> None:
        self.app, self.limits, self.admission = app, limits, admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.limits
        # /health is answered even when the queue is full: it is how operators see that it is full
        counted = not (scope.get("method") == "GET" and scope.get("path") == "/health")
        if counted and not self.admission.enter():
            return await _send_json(
                send,
                503,
                {"error": f"server busy: {limits.max_in_flight} requests in progress; retry later"},
                close=False,
            )
        try:
            await self._guarded(scope, receive, send)
        finally:
            if counted:
                self.admission.leave()

    async def _guarded(self, scope, receive, send):
        limits = self.limits
        too_large = f"request body larger than {limits.max_body_bytes:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return await _send_json(send, 413, {"error": too_large})
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + limits.read_timeout_s
        received = 0
        body_done = False
        refusal: tuple[int, str] | None = None
        started = False

        async def guarded_receive():
            nonlocal received, body_done, refusal
            if refusal is not None:
                raise _Refused
            if body_done:  # waiting for a disconnect only: no deadline of its own
                return await receive()
            try:
                event = await asyncio.wait_for(receive(), max(0.0, body_deadline - loop.time()))
            except asyncio.TimeoutError:
                refusal = (408, f"request body not received within {limits.read_timeout_s:g} s")
                raise _Refused from None
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limits.max_body_bytes:
                    refusal = (413, too_large)
                    raise _Refused
                body_done = not event.get("more_body", False)
            return event

        async def guarded_send(event):
            nonlocal started
            if refusal is not None:  # the routes' answer to a body we cut short (e.g. a 400 parse error)
                return
            started = started or event["type"] == "http.response.start"
            await send(event)

        # The deadline is kept here, not by cancelling and awaiting the app: a cancellation can be absorbed
        # inside the framework, and the answer must not wait for that.
        task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        done, _ = await asyncio.wait({task}, timeout=limits.request_timeout_s)
        if task in done:
            try:
                task.result()
            except _Refused:
                pass
        else:
            if refusal is None:
                refusal = (504, f"request took longer than {limits.request_timeout_s:g} s")
            task.cancel()  # its worker thread, if any, keeps its slot until it ends (see _Admission)
            task.add_done_callback(_retrieve)
        if refusal is not None and not started:
            await _send_json(send, refusal[0], {"error": refusal[1]}, close=True)


def _retrieve(task: asyncio.Task) -> None:
    """Collect an abandoned request's outcome (else asyncio logs 'exception was never retrieved')."""
    if not task.cancelled():
        task.exception()


async def _send_json(send, status: int, payload: dict, *, close: bool = True) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # a body we did not read would otherwise hold the connection open
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------- server


def server_config(app, limits: ServeLimits, *, host: str = "127.0.0.1", port: int = 8000, **options):
    """The ``uvicorn.Config`` that ``kprpe serve`` runs ``app`` with (the tests use the same).

    uvicorn's own ``limit_concurrency`` is left off: it counts sockets, so idle connections could lock
    everyone out with a plain-text 503; the guard counts requests instead. Sockets are bounded in time:
    headers within ``read_timeout_s`` (:class:`GuardedH11Protocol`), then the keep-alive idle timeout."""
    import uvicorn

    protocol = type("GuardedH11Protocol", (_guarded_h11(),), {"header_timeout_s": limits.read_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=None,
        timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
        **options,
    )


@functools.cache
def _guarded_h11():
    """uvicorn's h11 protocol with a header deadline (built on first use: uvicorn is an optional extra)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """uvicorn's h11 protocol plus a header deadline: a connection that has not sent a whole request
        head ``header_timeout_s`` after it opened (or after its previous response) is closed. uvicorn has
        no such timeout: a socket that sends nothing, or a header a byte at a time, would stay forever."""

        header_timeout_s = 10.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            self._arm_header_timer()  # before super(): it may start the next pipelined request
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            # no new request head since the timer was armed (a new one replaces self.cycle)
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol

