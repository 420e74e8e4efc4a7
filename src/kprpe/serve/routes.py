"""The FastAPI routes of ``kprpe serve`` (imported only when a server is built: FastAPI is an optional
extra)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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

__all__ = ["build_app", "create_app"]


def build_app(service: FaceService, limits: ServeLimits, admission) -> FastAPI:
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

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.describe(), "limits": asdict(limits)}

    @app.post("/embed")
    async def embed(image: Annotated[UploadFile, File()], keypoints: Annotated[str | None, Form()] = None):
        async def work(lease):
            photo = await read(image, "image", lease)
            points = parse_keypoints(keypoints, field="keypoints")
            faces, unit, norms = await lease.run(service.analyse, [("image", photo, points)])
            return {
                "embedding": unit[0].tolist(),
                "norm": float(norms[0]),
                "dim": int(unit.shape[1]),
                "face": face_json(faces[0]),
            }

        return await run(work)

    @app.post("/verify")
    async def verify(
        a: Annotated[UploadFile, File()],
        b: Annotated[UploadFile, File()],
        keypoints_a: Annotated[str | None, Form()] = None,
        keypoints_b: Annotated[str | None, Form()] = None,
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
                "faces": {"a": face_json(faces[0]), "b": face_json(faces[1])},
            }

        return await run(work)

    @app.post("/search")
    async def search(
        image: Annotated[UploadFile, File()],
        k: Annotated[int, Form()] = 5,
        keypoints: Annotated[str | None, Form()] = None,
    ):
        async def work(lease):
            if service.index is None:
                raise RequestError(400, "this server has no gallery index; start it with --index INDEX")
            if not 1 <= k <= limits.max_k:
                raise RequestError(422, f"field 'k': must be between 1 and {limits.max_k}, got {k}")
            photo = await read(image, "image", lease)
            points = parse_keypoints(keypoints, field="keypoints")
            faces, unit, _ = await lease.run(service.analyse, [("image", photo, points)])
            hits = await lease.run(service.index.search, unit, k)
            return {
                "matches": [
                    {"identity": h.identity, "score": h.score, "same": h.score >= service.threshold}
                    for h in hits[0]
                ],
                "threshold": service.threshold,
                "threshold_source": service.threshold_source,
                "face": face_json(faces[0]),
            }

        return await run(work)

    return app


def create_app(service: FaceService, limits: ServeLimits | None = None):
    """The ASGI application for ``service`` (run it with :func:`kprpe.serve.app.server_config`, or ``kprpe
    serve``): the routes behind the request guard (admission, body size, read timeout, deadline)."""
    limits = limits or ServeLimits()
    admission = _Admission(limits.max_concurrent, limits.max_in_flight)
    return _RequestGuard(build_app(service, limits, admission), limits, admission)
