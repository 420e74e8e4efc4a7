"""``kprpe serve`` with a Swin-KP-RPE checkpoint: /health and /embed over HTTP (keypoints supplied)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kprpe.serve import FaceService, ServeLimits, create_app  # noqa: E402

from .conftest import RunningServer  # noqa: E402
from .test_server import _png  # noqa: E402

SWIN = Path(__file__).resolve().parents[1] / "fixtures" / "swin_kprpe" / "tiny_swin_kprpe.safetensors"


def test_swin_server_embeds_with_supplied_keypoints(astronaut):
    from kprpe.face import FaceEmbedder

    embedder = FaceEmbedder.from_weights(SWIN, batch_size=2)
    service = FaceService(embedder, aligner="supplied", threshold=0.3, threshold_source="default (test)")
    limits = ServeLimits(max_upload_bytes=2**21, max_pixels=4_000_000, request_timeout_s=60, max_concurrent=1)
    points = [[203.0, 102.0], [246.0, 104.0], [224.0, 126.0], [203.0, 140.0], [244.0, 141.0]]
    with RunningServer(create_app(service, limits), limits) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["output_dim"] == 32
        response = httpx.post(
            f"{server.url}/embed",
            files={"image": ("f.png", _png(astronaut))},
            data={"keypoints": json.dumps(points)},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    embedding = np.array(response.json()["embedding"])
    assert embedding.shape == (32,) and abs(np.linalg.norm(embedding) - 1) < 1e-5
