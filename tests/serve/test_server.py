"""``kprpe serve``: the real server on 127.0.0.1, called over HTTP with httpx (good and bad uploads, limits,
50 concurrent requests)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("dlib")

from kprpe.serve import FaceService, ServeLimits, create_app  # noqa: E402

from .conftest import RunningServer, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import kprpe

    return kprpe.save_model(
        kprpe.create_model("vit_tiny_kprpe"), tmp_path_factory.mktemp("w") / "tiny.safetensors"
    )


@pytest.fixture(scope="module")
def service(weights, astronaut, tmp_path_factory):
    from kprpe.face import FaceEmbedder, FacePipeline
    from kprpe.gallery.index import GalleryIndex

    embedder = FaceEmbedder.from_weights(weights, batch_size=2)
    unit, _ = embedder.embed_faces(FacePipeline().faces_in_image(astronaut))
    index = GalleryIndex(embedder.output_dim, metadata={"model_fingerprint": embedder.fingerprint})
    other = np.random.default_rng(0).standard_normal((3, embedder.output_dim))
    index.add({"eileen": unit, "someone": other})
    path = index.save(tmp_path_factory.mktemp("index") / "gallery.npz")
    return FaceService(
        embedder,
        aligner="dlib",
        index=GalleryIndex.load(path),
        threshold=0.3,
        threshold_source="default (test)",
    )


@pytest.fixture(scope="module")
def server(service):
    limits = ServeLimits(
        max_upload_bytes=2 * 2**20,
        max_pixels=4_000_000,
        request_timeout_s=60,
        max_concurrent=2,
        max_queued=64,
    )
    with RunningServer(create_app(service, limits), limits) as running:
        yield running


@pytest.fixture(scope="module")
def astronaut_png(astronaut) -> bytes:
    return _png(astronaut)


def _error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["error"]


def test_health_describes_model_index_and_limits(server, service):
    response = httpx.get(f"{server.url}/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert body["aligner"] == "dlib" and body["model_fingerprint"] == service.embedder.fingerprint
    assert body["index"]["identities"] == 2 and body["limits"]["max_pixels"] == 4_000_000


def test_embed_returns_the_library_embedding_with_box_and_landmarks(
    server, service, astronaut, astronaut_png
):
    from kprpe.face import FacePipeline

    response = httpx.post(f"{server.url}/embed", files={"image": ("face.png", astronaut_png, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    face = FacePipeline().faces_in_image(astronaut)[0]
    expected, norms = service.embedder.embed_faces([face])
    np.testing.assert_allclose(body["embedding"], expected[0], atol=1e-5)
    assert body["norm"] == pytest.approx(float(norms[0]), rel=1e-5) and body["dim"] == len(body["embedding"])
    x0, y0, x1, y1 = body["face"]["box"]
    landmarks = np.array(body["face"]["landmarks"])
    assert landmarks.shape == (5, 2)
    assert (
        (landmarks[:, 0] > x0) & (landmarks[:, 0] < x1) & (landmarks[:, 1] > y0) & (landmarks[:, 1] < y1)
    ).all()
    # the eyes of the astronaut are near (203, 102) and (246, 104)
    np.testing.assert_allclose(landmarks[:2], [[203, 102], [246, 104]], atol=8)


def test_verify_and_search(server, astronaut, astronaut_png):
    mirrored = _png(np.ascontiguousarray(astronaut[:, ::-1]))
    response = httpx.post(
        f"{server.url}/verify", files={"a": ("a.png", astronaut_png), "b": ("b.png", mirrored)}
    )
    body = response.json()
    assert response.status_code == 200, response.text
    assert -1 <= body["similarity"] <= 1 and body["same"] == (body["similarity"] >= body["threshold"])
    assert body["threshold"] == 0.3 and body["threshold_source"] == "default (test)"
    assert set(body["faces"]) == {"a", "b"} and len(body["faces"]["b"]["landmarks"]) == 5
    response = httpx.post(f"{server.url}/search", files={"image": ("q.png", astronaut_png)}, data={"k": "2"})
    body = response.json()
    assert response.status_code == 200, response.text
    assert [m["identity"] for m in body["matches"]][0] == "eileen" and len(body["matches"]) == 2
    assert body["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4) and body["matches"][0]["same"] is True
    _error(
        httpx.post(f"{server.url}/search", files={"image": ("q.png", astronaut_png)}, data={"k": "0"}),
        422,
        "'k'",
    )
    _error(
        httpx.post(f"{server.url}/search", files={"image": ("q.png", astronaut_png)}, data={"k": "many"}),
        422,
        "k",
    )


def test_client_supplied_keypoints_skip_the_detector(server, astronaut_png):
    points = [[203.0, 102.0], [246.0, 104.0], [224.0, 126.0], [203.0, 140.0], [244.0, 141.0]]
    response = httpx.post(
        f"{server.url}/embed",
        files={"image": ("f.png", astronaut_png)},
        data={"keypoints": json.dumps(points)},
    )
    assert response.status_code == 200 and response.json()["face"]["landmarks"] == points
    _error(
        httpx.post(
            f"{server.url}/embed", files={"image": ("f.png", astronaut_png)}, data={"keypoints": "[1, 2]"}
        ),
        422,
        "keypoints",
    )


def _png_header_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of width x height zeros: a few hundred KB that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_uploads_get_json_4xx(server, astronaut_png):
    url = f"{server.url}/embed"
    _error(
        httpx.post(url, files={"image": ("notes.txt", b"hello, not an image", "text/plain")}),
        415,
        "not an image",
    )
    _error(httpx.post(url, files={"image": ("empty.png", b"", "image/png")}), 400, "0 bytes")
    _error(
        httpx.post(url, files={"image": ("cut.png", astronaut_png[: len(astronaut_png) // 3])}),
        400,
        "corrupt",
    )
    _error(httpx.post(url, data={"k": "1"}), 422, "image")
    bomb = _png_header_bomb(20000, 20000)  # 400 megapixels in about 50 KB
    assert len(bomb) < 100_000
    began = time.monotonic()
    _error(httpx.post(url, files={"image": ("bomb.png", bomb)}), 413, "pixels")
    assert time.monotonic() - began < 5  # refused from the header, never decoded
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    big = _png(noise) * 3  # > 2 MiB
    _error(httpx.post(url, files={"image": ("big.png", big)}), 413, "larger than")
    blank = _png(np.full((200, 200, 3), 128, np.uint8))
    _error(httpx.post(url, files={"image": ("blank.png", blank)}), 422, "no face")
    # a path in the file name is only a label: the bytes are decoded from memory
    response = httpx.post(url, files={"image": ("../../../etc/passwd", astronaut_png)})
    assert response.status_code == 200
    _error(
        httpx.post(f"{server.url}/verify", files={"a": ("a.png", astronaut_png), "b": ("b.txt", b"nope")}),
        415,
        "'b'",
    )
    _error(httpx.get(f"{server.url}/nothing-here"), 404, "Not Found")
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow
def test_fifty_concurrent_requests_all_answer_the_same(server, astronaut_png):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/embed", files={"image": ("f.png", astronaut_png)}) for _ in range(50))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 50
    embeddings = np.array([r.json()["embedding"] for r in responses])
    np.testing.assert_allclose(embeddings, embeddings[:1].repeat(50, axis=0), atol=1e-6)


def test_queue_bound_and_deadline(service, astronaut_png):
    tight = ServeLimits(max_concurrent=1, max_queued=1, request_timeout_s=60)
    with RunningServer(create_app(service, tight), tight) as running:

        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
                return await asyncio.gather(
                    *(client.post("/embed", files={"image": ("f.png", astronaut_png)}) for _ in range(12))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        assert httpx.get(f"{running.url}/health").status_code == 200
    hurried = ServeLimits(request_timeout_s=0.001)
    with RunningServer(create_app(service, hurried), hurried) as running:
        _error(
            httpx.post(f"{running.url}/embed", files={"image": ("f.png", astronaut_png)}), 504, "longer than"
        )


@pytest.mark.slow
def test_kprpe_serve_command_with_supplied_keypoints(weights, astronaut_png, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kprpe",
            "serve",
            "--weights",
            str(weights),
            "--port",
            str(port),
            "--aligner",
            "supplied",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"server did not start: {process.communicate()[1][-2000:]}"
                    ) from None
                time.sleep(0.3)
        assert health.json()["aligner"] == "supplied" and health.json()["threshold_source"].startswith(
            "default"
        )
        _error(httpx.post(f"{url}/embed", files={"image": ("f.png", astronaut_png)}), 422, "keypoints")
        points = json.dumps([[203, 102], [246, 104], [224, 126], [203, 140], [244, 141]])
        response = httpx.post(
            f"{url}/embed", files={"image": ("f.png", astronaut_png)}, data={"keypoints": points}
        )
        assert (
            response.status_code == 200 and len(response.json()["embedding"]) == health.json()["output_dim"]
        )
        _error(
            httpx.post(
                f"{url}/search", files={"image": ("f.png", astronaut_png)}, data={"keypoints": points}
            ),
            400,
            "no gallery index",
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
