"""``kprpe serve`` under hostile connections: idle and trickling sockets, timed-out work, bursts over the
queue, oversized chunked bodies, absurd form fields. The real server (uvicorn, configured as ``kprpe serve``
does) runs on 127.0.0.1 in front of a stand-in service whose "model" sleeps, so no checkpoint or detector is
needed."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kprpe.serve import ServeLimits, create_app  # noqa: E402

from .conftest import RunningServer  # noqa: E402


class SlowService:
    """What the routes need of a FaceService; :meth:`analyse` sleeps ``delay`` s and records how many calls
    ran at once (the bound the admission promises)."""

    aligner = "stand-in"
    index = None
    threshold = 0.3
    threshold_source = "test"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.active = 0
        self.most_active = 0
        self.calls = 0
        self._lock = threading.Lock()

    def analyse(self, images):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.delay)
            face = SimpleNamespace(
                box=[0.0, 0.0, 1.0, 1.0],
                source_keypoints=np.zeros((5, 2)),
                score=1.0,
                keypoints=np.zeros((5, 2)),
            )
            unit = np.eye(len(images), 4, dtype=np.float32)
            return [face] * len(images), unit, np.ones(len(images), np.float32)
        finally:
            with self._lock:
                self.active -= 1

    def describe(self) -> dict:
        return {"aligner": self.aligner}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["error"]


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds} s (got {received[:200]!r})")
    except ConnectionResetError:
        pass
    return received


def test_idle_sockets_do_not_lock_out_requests():
    # uvicorn's own cap (which counted sockets) would have been max_concurrent + max_queued + 8 = 11
    limits = ServeLimits(max_concurrent=1, max_queued=2, read_timeout_s=60)
    with RunningServer(create_app(SlowService(), limits), limits) as running:
        idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(75)]
        try:
            time.sleep(0.3)  # let the server accept them all
            health = httpx.get(f"{running.url}/health", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            response = httpx.post(f"{running.url}/embed", files={"image": ("f.png", _png())}, timeout=10)
            assert response.status_code == 200, response.text
        finally:
            for sock in idle:
                sock.close()


def test_silent_and_slow_header_connections_are_closed():
    limits = ServeLimits(read_timeout_s=0.5)
    with RunningServer(create_app(SlowService(), limits), limits) as running:
        silent = socket.create_connection(("127.0.0.1", running.port))
        slow = socket.create_connection(("127.0.0.1", running.port))
        try:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for _ in range(4):  # a header byte at a time, slower than the timeout allows in all
                time.sleep(0.2)
                try:
                    slow.sendall(b"X")
                except OSError:
                    break
            assert _closed_within(silent, 5) == b""
            assert _closed_within(slow, 5) == b""
            # a keep-alive connection gets the same deadline for its next request head
            with httpx.Client(base_url=running.url) as client:
                assert client.get("/health").status_code == 200
        finally:
            silent.close()
            slow.close()


def test_a_trickled_body_is_answered_408_and_closed():
    limits = ServeLimits(read_timeout_s=0.6)
    with RunningServer(create_app(SlowService(), limits), limits) as running:
        sock = socket.create_connection(("127.0.0.1", running.port))
        try:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 1000\r\n\r\n--b\r\n"
            )
            for _ in range(5):
                time.sleep(0.2)
                try:
                    sock.sendall(b"C")
                except OSError:
                    break
            answer = _closed_within(sock, 10)
        finally:
            sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"application/json" in head and b"not received within 0.6 s" in body


def test_timed_out_requests_keep_their_slot_until_their_work_ends():
    service = SlowService(delay=1.0)
    limits = ServeLimits(max_concurrent=1, max_queued=8, request_timeout_s=0.25)
    before = set(threading.enumerate())
    with RunningServer(create_app(service, limits), limits) as running:
        with httpx.Client(base_url=running.url, timeout=10) as client:
            # one after the other: each gives up at 0.25 s while the "model" works for 1 s
            for _ in range(5):
                _json_error(client.post("/embed", files={"image": ("f.png", _png())}), 504, "longer than")
        time.sleep(1.2)
        workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("kprpe-serve")]
    assert service.most_active == 1 and service.calls <= 2
    assert len(workers) <= limits.max_concurrent


def test_a_burst_over_the_queue_gets_json_503_not_resets():
    service = SlowService(delay=0.2)
    limits = ServeLimits(max_concurrent=1, max_queued=2, request_timeout_s=30)
    with RunningServer(create_app(service, limits), limits) as running:

        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                return await asyncio.gather(
                    *(client.post("/embed", files={"image": ("f.png", _png())}) for _ in range(24)),
                    return_exceptions=True,
                )

        answers = asyncio.run(burst())
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, failures[:3]
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 503}
    for answer in answers:
        if answer.status_code == 503:
            _json_error(answer, 503, "server busy")
    assert service.most_active == 1


def test_an_oversized_chunked_body_is_413():
    limits = ServeLimits(max_upload_bytes=50_000)  # a body may hold 2 x 50 KB + 64 KiB of form
    with RunningServer(create_app(SlowService(), limits), limits) as running:
        sock = socket.create_connection(("127.0.0.1", running.port))
        try:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n\r\n'
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            chunk = b"x" * 10_000
            for _ in range(17):  # 170 KB, just over the 165,536-byte cap
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
            answer = _closed_within(sock, 10)
        finally:
            sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"application/json" in head and b"request body larger than" in body


def test_deeply_nested_keypoints_are_a_422():
    limits = ServeLimits()
    with RunningServer(create_app(SlowService(), limits), limits) as running:
        for text in ("[" * 100_000, "[" * 2000 + "]" * 2000):
            response = httpx.post(
                f"{running.url}/embed",
                files={"image": ("f.png", _png())},
                data={"keypoints": text},
                timeout=10,
            )
            _json_error(response, 422, "keypoints")
