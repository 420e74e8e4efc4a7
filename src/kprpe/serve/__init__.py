"""``kprpe serve``: face embedding, verification and gallery search over HTTP (FastAPI + uvicorn).

Importing this package imports neither FastAPI nor uvicorn (``pip install 'kprpe[serve]'``); see
docs/serving.md.
"""

from __future__ import annotations

from .app import ALIGNERS, FaceService, RequestError, ServeLimits, decode_upload, server_config


def create_app(service: FaceService, limits: ServeLimits | None = None, *, host: str = "127.0.0.1"):
    """The ASGI application for ``service`` (see :func:`kprpe.serve.routes.create_app`). FastAPI is imported
    here, not at package import, so ``kprpe --help`` works without the ``serve`` extra."""
    from .routes import create_app as build

    return build(service, limits, host=host)


__all__ = [
    "ALIGNERS",
    "FaceService",
    "RequestError",
    "ServeLimits",
    "create_app",
    "decode_upload",
    "server_config",
]
