"""The gallery in a vector database (Milvus Lite, Qdrant local mode): the same answers as the file index,
idempotent writes, the fingerprint check, and a writer killed mid-enrolment leaving no half-written
identity."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kprpe.gallery.database import DatabaseGallery, identity_id, is_database_uri, parse_gallery_uri
from kprpe.gallery.index import GalleryIndex, GalleryIndexError

REPO = Path(__file__).resolve().parents[2]
# stored templates are float32; a score is a 32-d float32 dot product of unit vectors (error ~ 32 x 6e-8)
ATOL = 1e-5


def _engine(name: str, module: str):
    missing = importlib.util.find_spec(module) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{module} not installed"))


ENGINES = [_engine("milvus", "pymilvus"), _engine("qdrant", "qdrant_client")]


def _uri(engine: str, tmp_path: Path) -> str:
    return f"milvus://{tmp_path / 'g.db'}" if engine == "milvus" else f"qdrant://{tmp_path / 'qdrant'}"


def _photos(seed: int, identities: int, dim: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"id{i:03d}": rng.standard_normal((int(rng.integers(1, 4)), dim)) for i in range(identities)}


def test_uris_name_an_engine_and_paths_stay_files():
    assert parse_gallery_uri("gallery.npz") is None and not is_database_uri("/data/g.npz")
    assert parse_gallery_uri("milvus:///data/g.db") == ("milvus", "/data/g.db")
    assert parse_gallery_uri("http://db:19530") == ("milvus", "http://db:19530")
    assert parse_gallery_uri("qdrant:///data/q") == ("qdrant", "/data/q")
    assert parse_gallery_uri("qdrant+http://db:6333") == ("qdrant", "http://db:6333")
    with pytest.raises(GalleryIndexError, match="unknown scheme"):
        parse_gallery_uri("redis://db/0")
    with pytest.raises(GalleryIndexError, match="names no path"):
        parse_gallery_uri("milvus://")
    assert identity_id("ann") == identity_id("ann") != identity_id("bob")
    assert 0 <= identity_id("ann") < 2**63


@pytest.mark.parametrize("engine", ENGINES)
def test_same_operations_and_answers_as_the_file_index(engine, tmp_path):
    uri = _uri(engine, tmp_path)
    with pytest.raises(GalleryIndexError, match="does not exist"):
        DatabaseGallery.open(uri)
    assert list(tmp_path.iterdir()) == []  # opening to read creates nothing
    reference = GalleryIndex(32, backend="numpy")
    with DatabaseGallery.open(uri, dim=32, metadata={"model_fingerprint": "model-a"}) as gallery:
        for seed in (1, 2):  # the second round grows existing identities and adds new ones
            photos = _photos(seed, 12 + 4 * seed)
            reference.add(photos)
            gallery.add(photos)
        names = ["id003", "id007"]
        gallery.add_embeddings(names, np.ones((2, 32)))
        reference.add_embeddings(names, np.ones((2, 32)))
        assert gallery.remove(["id005"]) == reference.remove(["id005"])
        with pytest.raises(GalleryIndexError, match="not in the gallery"):
            gallery.remove(["id001", "nobody"])  # checked before anything changes
        assert "id001" in gallery and "id005" not in gallery and len(gallery) == len(reference) == 19
        assert gallery.names == sorted(reference.names)
        assert gallery.count("id003") == reference.count("id003")
        np.testing.assert_allclose(gallery.template("id003"), reference.template("id003"), atol=ATOL)
        queries = np.random.default_rng(9).standard_normal((5, 32)) * 7  # raw, not unit: normalised
        got, want = gallery.search(queries, k=4), reference.search(queries, k=4)
        assert [[h.identity for h in row] for row in got] == [[h.identity for h in row] for row in want]
        np.testing.assert_allclose(
            [[h.score for h in row] for row in got], [[h.score for h in row] for row in want], atol=ATOL
        )
        assert len(gallery.search(queries[0], k=50)[0]) == 19
        with pytest.raises(GalleryIndexError, match="queries are"):
            gallery.search(np.ones((1, 31)))
        with pytest.raises(GalleryIndexError, match="NaN"):
            gallery.add({"bad": np.full((1, 32), np.nan)})
        assert "bad" not in gallery
    with DatabaseGallery.open(uri) as again:  # reopened: the metadata and the rows persisted
        assert again.metadata == {"model_fingerprint": "model-a"} and len(again) == 19
        again.check_compatible("model-a", 32)
        with pytest.raises(GalleryIndexError, match="different weights"):
            again.check_compatible("model-b")
    with pytest.raises(GalleryIndexError, match="different weights"):
        DatabaseGallery.open(uri, dim=32, metadata={"model_fingerprint": "model-b"})


@pytest.mark.parametrize("engine", ENGINES)
def test_rewriting_an_enrolment_is_idempotent(engine, tmp_path):
    staging = GalleryIndex(32, backend="numpy")
    staging.add(_photos(3, 30))
    partial = GalleryIndex(32, backend="numpy")  # what a run killed half-way had written
    partial.add({name: np.stack([staging.template(name)]) for name in staging.names[:11]})
    with DatabaseGallery.open(_uri(engine, tmp_path), dim=32) as gallery:
        gallery.write(partial, pool=False)
        for _ in range(2):  # re-running the whole enrolment, twice, gives the one clean result
            gallery.write(staging, pool=False)
        assert gallery.names == staging.names
        for name in staging.names:
            assert gallery.count(name) == staging.count(name)
            np.testing.assert_allclose(gallery.template(name), staging.template(name), atol=ATOL)
        gallery.clear()  # what search enrol --overwrite does first
    with pytest.raises(GalleryIndexError, match="holds no kprpe gallery"):
        DatabaseGallery.open(_uri(engine, tmp_path))


WRITER = """
import sys, numpy as np
from kprpe.gallery.database import DatabaseGallery
from kprpe.gallery.index import GalleryIndex
gallery = DatabaseGallery.open(sys.argv[1], dim=64)
rng = np.random.default_rng(0)
for batch in range(10_000):
    staging = GalleryIndex(64, backend="numpy")
    staging.add({f"b{batch}_{i}": rng.standard_normal((3, 64)) for i in range(16)})
    gallery.write(staging, pool=False)
    print(batch, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_a_writer_killed_mid_enrolment_leaves_only_whole_identities(engine, tmp_path):
    uri = _uri(engine, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, uri],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    done = 0
    while done < 20:  # let it commit a few batches, then kill it in the middle of the next ones
        line = writer.stdout.readline()
        assert line or time.monotonic() < deadline, writer.stderr.read()[-2000:]
        done = int(line) + 1 if line.strip() else done
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    with DatabaseGallery.open(uri) as gallery:
        names = gallery.names
        assert len(names) >= 16 * done  # everything reported as written survived
        for name in names:  # every row visible is whole: its count, a unit template, its own name
            assert gallery.count(name) == 3
            assert abs(float(np.linalg.norm(gallery.template(name))) - 1) < 1e-5


@pytest.mark.parametrize("engine", [_engine("qdrant", "qdrant_client")])
def test_an_unreachable_server_is_a_one_line_error(engine):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GalleryIndexError, match=f"gallery qdrant\\+http://127.0.0.1:{port}: qdrant failed"):
        DatabaseGallery.open(f"qdrant+http://127.0.0.1:{port}")
