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
the request body is capped while it streams in; images are refused by their header's pixel count before any
pixel is decoded (decompression bombs); at most ``max_concurrent`` requests work at once and at most
``max_queued`` wait (the rest get 503); each request has a deadline (504); detection and the model run under
one lock, so one model instance serves every request safely. Every error is JSON ``{"error": ...}`` with a
4xx (or 503/504) status.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import warnings
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import KprpeError

__all__ = ["ALIGNERS", "ServeLimits", "FaceService", "RequestError", "decode_upload"]

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

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise KprpeError(f"serve limit {name} must be positive, got {value}")

    @property
    def max_body_bytes(self) -> int:
        return 2 * self.max_upload_bytes + 64 * 1024


# ------------------------------------------------------------------------------------------------ decoding


def decode_upload(data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> upright RGB uint8, refusing empty, non-image, oversized and corrupt uploads."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..images import to_rgb_uint8

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
                opened.load()
                upright = ImageOps.exif_transpose(opened)
                return to_rgb_uint8(upright if upright is not None else opened)
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


def parse_keypoints(text: str | None, *, field: str) -> np.ndarray | None:
    """Form field holding 5 ``[x, y]`` photo-pixel points as JSON, or None when absent."""
    if text is None or not text.strip():
        return None
    try:
        points = np.asarray(json.loads(text), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise RequestError(
            422, f"field {field!r}: expected JSON [[x, y] x 5] in photo pixels, got {text[:80]!r}"
        ) from None
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise RequestError(422, f"field {field!r}: expected 5 finite [x, y] points, got shape {points.shape}")
    return points


# ------------------------------------------------------------------------------------------------ aligners


def _dlib_aligner(options: dict) -> Callable:
    from ..face.dlib_backend import DlibDetector
    from ..face.pipeline import FacePipeline

    pipeline = FacePipeline(DlibDetector(options.get("detector", "hog"), options.get("landmark_model", "68")))
    pipeline.detector  # noqa: B018 - load dlib's models now, not on the first request
    return pipeline.faces_in_image


def _dfa_aligner(options: dict) -> Callable:
    from ..face.dfa_backend import load_dfa_backend
    from ..face.pipeline import FacePipeline

    backend = load_dfa_backend(
        options.get("weights"), device=options.get("device", "cpu"), min_score=options.get("min_score")
    )
    return FacePipeline(backend).faces_in_image


def _supplied_aligner(options: dict) -> Callable:
    def faces_in_image(image: np.ndarray) -> list:
        raise RequestError(
            422,
            "this server uses --aligner supplied: send the face's 5 keypoints in the "
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


def _faces_from_keypoints(image: np.ndarray, keypoints: np.ndarray) -> list:
    """Crop the face the client located itself (keypoints in the request: no detector runs)."""
    from ..face.landmark_files import SuppliedLandmarks
    from ..face.pipeline import FacePipeline

    return FacePipeline(SuppliedLandmarks.from_arrays({"upload": keypoints})).faces_in_image(
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
    ) -> None:
        if aligner not in ALIGNERS:
            raise KprpeError(f"unknown aligner {aligner!r}; choose one of {sorted(ALIGNERS)}")
        self.embedder = embedder
        self.aligner = aligner
        self._faces_in_image = ALIGNERS[aligner](dict(aligner_options or {}))
        self.index = index
        self.threshold = float(threshold)
        self.threshold_source = threshold_source
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
                        _faces_from_keypoints(image, keypoints)
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

    def describe(self) -> dict:
        return {
            "aligner": self.aligner,
            "model_fingerprint": self.embedder.fingerprint,
            "output_dim": self.embedder.output_dim,
            "flip": self.embedder.flip,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "index": self.index.describe() if self.index is not None else None,
        }


def face_json(face) -> dict:
    return {
        "box": [float(v) for v in face.box] if face.box is not None else None,
        "landmarks": np.asarray(face.source_keypoints, dtype=np.float64).round(3).tolist(),
        "score": None if face.score is None else float(face.score),
        "crop_keypoints": np.asarray(face.keypoints, dtype=np.float64).round(6).tolist(),
    }


# ----------------------------------------------------------------------------------------------- admission


class _Admission:
    """At most ``max_concurrent`` requests work; at most ``max_queued`` wait; the rest are turned away."""

    def __init__(self, max_concurrent: int, max_queued: int) -> None:
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
        if self._semaphore.locked() and self.waiting >= self.max_queued:
            raise RequestError(
                503,
                f"server busy: {self.max_concurrent} requests running and "
                f"{self.waiting} waiting; retry later",
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by Content-Length, and while they stream in)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than {self.max_bytes:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(send, 413, {"error": message})
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return event

        async def tracking_send(event):
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"error": message})


class _BodyTooLarge(KprpeError):
    pass


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
