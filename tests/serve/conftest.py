"""Fixtures for the HTTP service tests: the astronaut photo (a real face, from scikit-image) and a real
uvicorn server on a free local port, configured as ``kprpe serve`` configures it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from process_group import free_port  # the one helper (tests/ is on sys.path, as for the distributed tests)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


class RunningServer:
    """uvicorn in a thread on a free local port, with ``kprpe serve``'s configuration for ``limits``."""

    def __init__(self, app, limits) -> None:
        import uvicorn

        from kprpe.serve import server_config

        self.port = free_port()
        self.server = uvicorn.Server(server_config(app, limits, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
