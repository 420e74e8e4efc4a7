"""Two ``kprpe serve`` processes sharing one gallery in a Milvus server (``milvus-lite server``, the same
protocol as a Milvus cluster) see each other's enrolments and removals at once. An embedded Milvus Lite file
cannot be shared: a second process is refused with a one-line error that points at a server URI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pymilvus")
httpx = pytest.importorskip("httpx")

from .conftest import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
POINTS = json.dumps([[203, 102], [246, 104], [224, 126], [203, 140], [244, 141]])  # the astronaut's face


def _wait(url: str, process: subprocess.Popen, path: str = "/health") -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}{path}", timeout=2)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                why = process.communicate()[1][-2000:]
                raise AssertionError(f"{process.args[:4]} did not start: {why}") from None
            time.sleep(0.3)


def _serve(weights, gallery: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    argv = [sys.executable, "-m", "kprpe", "serve", "--weights", str(weights), "--gallery", gallery]
    argv += ["--port", str(port), "--aligner", "supplied", "--log-level", "warning"]
    process = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return f"http://127.0.0.1:{port}", process


@pytest.mark.slow
def test_two_serve_processes_share_a_milvus_server_gallery(tmp_path, astronaut):
    import io

    from PIL import Image

    import kprpe
    from kprpe.face import FaceEmbedder
    from kprpe.gallery.database import DatabaseGallery

    server_binary = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
    if not Path(server_binary).exists():
        pytest.skip("milvus-lite's server command is not installed")
    weights = kprpe.save_model(kprpe.create_model("vit_tiny_kprpe"), tmp_path / "tiny.safetensors")
    embedder = FaceEmbedder.from_weights(weights)
    milvus_port = free_port()
    milvus = subprocess.Popen(
        [server_binary, "server", "--data-dir", str(tmp_path / "milvus"), "--host", "127.0.0.1"]
        + ["--port", str(milvus_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes = [milvus]
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="PNG")
    photo = {"image": ("f.png", buffer.getvalue())}
    try:
        uri = f"http://127.0.0.1:{milvus_port}"
        deadline = time.monotonic() + 60
        while True:  # the gallery is created (empty) with the model's fingerprint, as 'search enrol' does
            try:
                DatabaseGallery.open(
                    uri, dim=embedder.output_dim, metadata={"model_fingerprint": embedder.fingerprint}
                ).close()
                break
            except kprpe.errors.KprpeError:
                if milvus.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        (url_a, a), (url_b, b) = _serve(weights, uri), _serve(weights, uri)
        processes += [a, b]
        _wait(url_a, a)
        _wait(url_b, b)
        enrolled = httpx.post(
            f"{url_a}/gallery/enrol",
            files=photo,
            data={"identity": "eileen", "keypoints": POINTS},
            timeout=60,
        )
        assert enrolled.status_code == 200, enrolled.text
        found = httpx.post(f"{url_b}/search", files=photo, data={"keypoints": POINTS, "k": 1}, timeout=60)
        assert found.status_code == 200, found.text
        [match] = found.json()["matches"]
        assert match["identity"] == "eileen" and match["score"] > 0.999  # the same photo and keypoints
        listing = httpx.get(f"{url_b}/gallery").json()
        assert listing["identities"] == ["eileen"]
        # changes persist in the database (the page said "last until the server stops": no file was named)
        assert listing["saved_to"] == "database" and listing["saved_to_file"] is False
        removed = httpx.post(f"{url_b}/gallery/remove", data={"identity": "eileen"}, timeout=60)
        assert removed.status_code == 200, removed.text
        assert httpx.get(f"{url_a}/gallery").json()["identities"] == []
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)


def test_an_embedded_milvus_lite_file_is_refused_to_a_second_process(tmp_path):
    from kprpe.gallery.database import DatabaseGallery

    uri = f"milvus://{tmp_path / 'g.db'}"
    code = "\n".join(
        [
            "import sys",
            "from kprpe.gallery.database import DatabaseGallery",
            "from kprpe.errors import KprpeError",
            "try:",
            f"    DatabaseGallery.open({uri!r})",
            "except KprpeError as exc:",
            "    print(exc)",
            "    sys.exit(3)",
        ]
    )
    with DatabaseGallery.open(uri, dim=4, metadata={}):
        other = subprocess.run(
            [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
        )
    assert other.returncode == 3, other.stderr[-2000:]
    assert "server URI" in other.stdout and "Traceback" not in other.stdout


def test_serve_gallery_option_opens_the_database_and_writes_through(tmp_path):
    import argparse

    import numpy as np

    import kprpe
    from kprpe.cli.serve import build_service, register
    from kprpe.face import FaceEmbedder
    from kprpe.gallery.database import DatabaseGallery

    weights = kprpe.save_model(kprpe.create_model("vit_tiny_kprpe"), tmp_path / "tiny.safetensors")
    embedder = FaceEmbedder.from_weights(weights)
    uri = f"milvus://{tmp_path / 'g.db'}"
    DatabaseGallery.open(uri, dim=embedder.output_dim, metadata={"model_fingerprint": embedder.fingerprint})
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["serve", "--weights", str(weights), "--aligner", "supplied"]
    with pytest.raises(SystemExit):  # --index is the old spelling of --gallery: one gallery, given once
        parser.parse_args([*argv, "--gallery", uri, "--index", str(tmp_path / "g.npz")])
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--index", str(tmp_path / "g.npz"), "--gallery", uri])
    service = build_service(parser.parse_args([*argv, "--gallery", uri]))
    assert service.index_path is None and service.describe()["index"]["backend"] == "milvus"
    unit = np.random.default_rng(0).standard_normal((1, embedder.output_dim))
    assert service.enrol("ann", unit) == 1
    # written through at once: another handle on the same gallery finds it, with no save
    assert [h.identity for h in DatabaseGallery.open(uri).search(unit, k=1)[0]] == ["ann"]
    assert service.search(unit, 1)[0][0].identity == "ann"
    service.remove("ann")
    assert len(DatabaseGallery.open(uri)) == 0
