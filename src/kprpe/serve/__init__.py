"""``kprpe serve``: face embedding, verification and gallery search over HTTP (FastAPI + uvicorn).

Importing this package imports neither FastAPI nor uvicorn (``pip install 'kprpe[serve]'``); see docs/serving.md.
"""

from __future__ import annotations

from .app import ALIGNERS, FaceService, RequestError, ServeLimits, create_app, decode_upload

__all__ = ["ALIGNERS", "FaceService", "RequestError", "ServeLimits", "create_app", "decode_upload"]
