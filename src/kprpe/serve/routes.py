"""The FastAPI routes of ``kprpe serve`` (imported only when a server is built: FastAPI is an optional
extra)."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import asdict
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .app import (
    FaceService,
    RequestError,
    ServeLimits,
    _Admission,
    _RequestGuard,
    decode_upload,
    face_json,
    parse_keypoints,
)

__all__ = ["build_app", "create_app", "is_loopback"]

# The page's files (kprpe/serve/page/, shipped as package data) and the types they are served with.
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# No inline script, nothing from elsewhere: an injected tag could not run even if one slipped through.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
MAX_IDENTITY_CHARS = 200


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from elsewhere
        return False


def _page_file(name: str) -> bytes:
    return resources.files("kprpe.serve").joinpath("page", name).read_bytes()


def build_app(service: FaceService, limits: ServeLimits, admission, *, public: bool = False) -> FastAPI:
    app = FastAPI(
        title="kprpe",
        description="KP-RPE face embedding, verification and search",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    async def read(upload: UploadFile, field: str, lease) -> np.ndarray:
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise RequestError(413, f"field {field!r}: upload larger than {limits.max_upload_bytes:,} bytes")
        return await lease.run(decode_upload, data, field=field, max_pixels=limits.max_pixels)

    async def run(work):
        """``work(lease)`` (a coroutine function) once a working slot is free; the request deadline around
        it (body read included) is :class:`_RequestGuard`'s."""
        async with admission.slot() as lease:
            return await work(lease)

    def check_write(request: Request) -> None:
        """Gallery writes: the API key when one is set; without one, only a loopback-only server accepts."""
        given = request.headers.get("x-api-key", "")
        if service.api_key is not None:
            if not secrets.compare_digest(given.encode(), service.api_key.encode()):
                raise RequestError(401, "gallery changes need the server's API key (header X-API-Key)")
        elif public:
            raise RequestError(
                403, "gallery changes are refused: this server listens beyond loopback and has no API key "
                "(start it with --api-key or KPRPE_API_KEY)"
            )

    @app.get("/")
    async def page():
        return Response(_page_file("index.html"), media_type=PAGE_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/page/{name}")
    async def page_file(name: str):
        if name not in PAGE_FILES:  # a fixed list: no path from the request reaches the file system
            raise RequestError(404, "no such page file")
        return Response(_page_file(name), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.describe(), "limits": asdict(limits)}

    @app.post("/embed")
    async def embed(
        image: Annotated[UploadFile, File()],
        keypoints: Annotated[str | None, Form()] = None,
        visual: Annotated[bool, Query()] = False,
    ):
        async def work(lease):
            photo = await read(image, "image", lease)
            points = parse_keypoints(keypoints, field="keypoints")
            faces, unit, norms = await lease.run(service.analyse, [("image", photo, points)])
            return {
                "embedding": unit[0].tolist(),
                "norm": float(norms[0]),
                "dim": int(unit.shape[1]),
                "face": face_json(faces[0], visual=visual),
            }

        return await run(work)

    @app.post("/verify")
    async def verify(
        a: Annotated[UploadFile, File()],
        b: Annotated[UploadFile, File()],
        keypoints_a: Annotated[str | None, Form()] = None,
        keypoints_b: Annotated[str | None, Form()] = None,
        visual: Annotated[bool, Query()] = False,
    ):
        async def work(lease):
            photos = [await read(a, "a", lease), await read(b, "b", lease)]
            points = [
                parse_keypoints(keypoints_a, field="keypoints_a"),
                parse_keypoints(keypoints_b, field="keypoints_b"),
            ]
            faces, unit, norms = await lease.run(
                service.analyse, [("a", photos[0], points[0]), ("b", photos[1], points[1])]
            )
            similarity = float(np.clip(unit[0].astype(np.float64) @ unit[1].astype(np.float64), -1.0, 1.0))
            return {
                "similarity": similarity,
                "same": similarity >= service.threshold,
                "threshold": service.threshold,
                "threshold_source": service.threshold_source,
                "norms": [float(norms[0]), float(norms[1])],
                "faces": {"a": face_json(faces[0], visual=visual), "b": face_json(faces[1], visual=visual)},
            }

        return await run(work)

    @app.post("/search")
    async def search(
        image: Annotated[UploadFile, File()],
        k: Annotated[int, Form()] = 5,
        keypoints: Annotated[str | None, Form()] = None,
        visual: Annotated[bool, Query()] = False,
    ):
        async def work(lease):
            if service.index is None:
                raise RequestError(400, "this server has no gallery index; start it with --gallery GALLERY")
            if not 1 <= k <= limits.max_k:
                raise RequestError(422, f"field 'k': must be between 1 and {limits.max_k}, got {k}")
            photo = await read(image, "image", lease)
            points = parse_keypoints(keypoints, field="keypoints")
            faces, unit, _ = await lease.run(service.analyse, [("image", photo, points)])
            hits = await lease.run(service.search, unit, k)
            return {
                "matches": [
                    {
                        "identity": h.identity,
                        "score": h.score,
                        "same": h.score >= service.threshold,
                        **({"thumbnails": service.thumbnail_urls(h.identity)} if visual else {}),
                    }
                    for h in hits[0]
                ],
                "threshold": service.threshold,
                "threshold_source": service.threshold_source,
                "face": face_json(faces[0], visual=visual),
            }

        return await run(work)

    @app.get("/gallery")
    async def gallery():
        if service.index is None:
            return {"identities": None, "writable": False}
        names = service.index.names
        return {
            "identities": names,
            "saved_to_file": service.index_path is not None,
            # where enrol/remove changes persist: "file" (the --gallery file), "database" (written as they
            # are made), or null (memory only: gone when the server stops)
            "saved_to": service.saved_to,
            "keeps_thumbnails": service.thumbnails is not None,
            "thumbnails": {name: service.thumbnail_urls(name) for name in names},
        }

    @app.get("/gallery/thumbnail/{key}/{number}")
    async def thumbnail(key: str, number: int):
        from ..gallery.thumbnails import ThumbnailError

        if service.thumbnails is None:
            raise RequestError(404, "this server keeps no thumbnails")
        try:  # the key is checked to be a hash before any path is made from it
            data = service.thumbnails.read(key, number)
        except ThumbnailError as exc:
            raise RequestError(404, str(exc)) from None
        return Response(data, media_type="image/jpeg", headers=PAGE_HEADERS)

    @app.post("/gallery/enrol")
    async def enrol(
        request: Request,
        image: Annotated[UploadFile, File()],
        identity: Annotated[str, Form()],
        keypoints: Annotated[str | None, Form()] = None,
    ):
        check_write(request)
        name = _identity(identity)

        async def work(lease):
            photo = await read(image, "image", lease)
            points = parse_keypoints(keypoints, field="keypoints")
            faces, unit, _ = await lease.run(service.analyse, [("image", photo, points)])
            count = await lease.run(service.enrol, name, unit, faces[0].image)
            return {
                "identity": name,
                "faces": count,
                "face": face_json(faces[0], visual=True),
                "thumbnails": service.thumbnail_urls(name),
            }

        return await run(work)

    @app.post("/gallery/remove")
    async def remove(request: Request, identity: Annotated[str, Form()]):
        check_write(request)
        name = _identity(identity)

        async def work(lease):
            await lease.run(service.remove, name)
            return {"removed": name}

        return await run(work)

    @app.get("/kprpe")
    async def kprpe_info():
        view = service.kprpe_view()
        if isinstance(view, str):
            return {"available": False, "reason": view}
        return {"available": True, **view.describe()}

    @app.post("/kprpe/bias")
    async def kprpe_bias(
        keypoints: Annotated[list[list[float]], Body()],
        query: Annotated[int, Body()],
        layer: Annotated[int, Body()] = 0,
        head: Annotated[int | None, Body()] = None,
    ):
        view = service.kprpe_view()
        if isinstance(view, str):
            raise RequestError(400, view)
        points = np.asarray(keypoints, dtype=np.float64)
        if points.shape != (5, 2) or not np.isfinite(points).all() or np.abs(points).max() > 4:
            raise RequestError(
                422, f"field 'keypoints': expected 5 finite [x, y] points in crop units (0-1), "
                f"got {str(keypoints)[:80]}",
            )

        async def work(lease):
            try:
                rows = await lease.run(service.bias_rows, view, points, query, layer, head)
            except ValueError as exc:
                raise RequestError(422, str(exc)) from None
            return {**view.describe(), "query": query, "layer": layer, "head": head, **rows}

        return await run(work)

    return app


def _identity(text: str) -> str:
    name = text.strip()
    if not name or len(name) > MAX_IDENTITY_CHARS or any(ord(c) < 32 for c in name):
        raise RequestError(
            422, f"field 'identity': 1 to {MAX_IDENTITY_CHARS} printable characters, got {text[:80]!r}"
        )
    return name


def create_app(service: FaceService, limits: ServeLimits | None = None, *, host: str = "127.0.0.1"):
    """The ASGI application for ``service`` (run it with :func:`kprpe.serve.app.server_config`, or ``kprpe
    serve``): the routes behind the request guard (admission, body size, read timeout, deadline). ``host`` is
    the address it listens on: beyond loopback, gallery writes need ``service.api_key``."""
    limits = limits or ServeLimits()
    admission = _Admission(limits.max_concurrent, limits.max_in_flight)
    app = build_app(service, limits, admission, public=not is_loopback(host))
    return _RequestGuard(app, limits, admission)
