"""The gallery in a vector database (Milvus Lite, Qdrant local mode): the same answers as the file index,
idempotent writes, the fingerprint check, and a writer killed mid-enrolment leaving no half-written
identity."""

from __future__ import annotations

import importlib.util
import json
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("engine", [_engine("qdrant", "qdrant_client")])
def test_an_unreachable_server_is_a_one_line_error(engine):
    port = _free_port()
    with pytest.raises(GalleryIndexError, match=f"gallery qdrant\\+http://127.0.0.1:{port}: qdrant failed"):
        DatabaseGallery.open(f"qdrant+http://127.0.0.1:{port}")


@pytest.mark.parametrize("engine", [_engine("qdrant", "qdrant_client")])
def test_an_unreachable_server_leaves_no_late_version_warning(engine):
    # qdrant-client's own version check warned from a background thread after open's error had been raised,
    # landing on whatever ran next (another test, another request); the threads the open started are joined
    # so that such a warning, if any, is recorded here
    import threading
    import warnings

    before = set(threading.enumerate())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GalleryIndexError, match="qdrant failed"):
            DatabaseGallery.open(f"qdrant+http://127.0.0.1:{_free_port()}")
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=30)
    assert not [w for w in caught if "version" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("engine", [_engine("qdrant", "qdrant_client")])
@pytest.mark.parametrize("version", ["0.1.0", "same"])
def test_a_server_of_another_version_is_warned_about_when_opened(engine, version):
    import importlib.metadata
    import threading
    import warnings
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    client = importlib.metadata.version("qdrant-client")
    reported = client if version == "same" else version

    class Handler(BaseHTTPRequestHandler):  # a "server" that only reports its version
        def do_GET(self):
            body = json.dumps({"title": "qdrant", "version": reported}).encode()
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(GalleryIndexError, match="qdrant failed in read_meta"):  # the rest is a 404
                DatabaseGallery.open(f"qdrant+http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    found = [str(w.message) for w in caught if "qdrant-client is" in str(w.message)]
    if version == "same":
        assert found == []
    else:
        assert len(found) == 1 and f"runs version '0.1.0', qdrant-client is {client}" in found[0]


def _digest(i: int) -> bytes:
    import hashlib

    return hashlib.sha256(f"image {i}".encode()).digest()


def _staged(rows: dict[str, list[int]], seed: int = 0) -> GalleryIndex:
    """A staging index whose identities pooled the images numbered ``rows[name]``."""
    rng = np.random.default_rng(seed)
    staging = GalleryIndex(32, backend="numpy")
    names = [name for name, images in rows.items() for _ in images]
    staging.add_embeddings(
        names, rng.standard_normal((len(names), 32)), digests=[_digest(i) for i in sum(rows.values(), [])]
    )
    return staging


@pytest.mark.parametrize("engine", ENGINES)
def test_each_row_records_its_images(engine, tmp_path):
    uri = _uri(engine, tmp_path)
    with DatabaseGallery.open(uri, dim=32) as gallery:
        assert gallery.records_images
        gallery.write(_staged({"ann": [0, 1], "bob": [0]}), pool=True)
        template = gallery.template("ann")
        with pytest.raises(GalleryIndexError, match="already pooled"):  # pooling image 1 again: refused
            gallery.write(_staged({"ann": [1, 2]}, seed=1), pool=True)
        assert gallery.count("ann") == 2
        np.testing.assert_array_equal(gallery.template("ann"), template)
        gallery.write(_staged({"ann": [2]}, seed=1), pool=True)
        gallery.add({"ann": np.ones((1, 32))})  # pooled without a digest (kprpe serve's page): unknown
        assert gallery.image_records(["ann", "bob", "nobody"]) == {
            "ann": (frozenset({_digest(0), _digest(1), _digest(2)}), 4),
            "bob": (frozenset({_digest(0)}), 1),
        }
        gallery.write(_staged({"bob": [7]}), pool=False)  # without pooling the record is set, as the template
        assert gallery.image_records(["bob"])["bob"] == (frozenset({_digest(7)}), 1)
        gallery.remove(["ann"])  # the record goes with the row
        gallery.write(_staged({"ann": [0]}), pool=True)
        assert gallery.image_records(["ann"])["ann"] == (frozenset({_digest(0)}), 1)
    with DatabaseGallery.open(uri) as again:  # persisted
        assert again.image_records(["bob"])["bob"] == (frozenset({_digest(7)}), 1)


@pytest.mark.parametrize("engine", [_engine("qdrant", "qdrant_client")])
def test_qdrant_rows_written_before_the_record_append_with_unknown_images(engine, tmp_path):
    with DatabaseGallery.open(_uri(engine, tmp_path), dim=32) as gallery:
        staging = _staged({"ann": [0, 1]})
        # the row an older kprpe wrote: no record in its payload
        gallery._store.upsert([identity_id("ann")], ["ann"], *staging.pooled_rows(["ann"]), None)
        assert gallery.image_records(["ann"])["ann"] == (frozenset(), 2)
        gallery.write(_staged({"ann": [0]}, seed=2), pool=True)  # image 0 is unknown, so it is pooled again
        assert gallery.image_records(["ann"])["ann"] == (frozenset({_digest(0)}), 3)


@pytest.mark.parametrize("engine", [_engine("milvus", "pymilvus")])
def test_milvus_galleries_without_the_record_field_still_append(engine, tmp_path):
    from pymilvus import DataType, MilvusClient

    uri = _uri(engine, tmp_path)
    client = MilvusClient(str(tmp_path / "g.db"))  # the schema kprpe created before there was a record
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("name", DataType.VARCHAR, max_length=4096)
    schema.add_field("template", DataType.FLOAT_VECTOR, dim=32)
    schema.add_field("sum_norm", DataType.DOUBLE)
    schema.add_field("count", DataType.INT64)
    params = client.prepare_index_params()
    params.add_index("template", index_type="FLAT", metric_type="IP")
    client.create_collection("kprpe_gallery", schema=schema, index_params=params, consistency_level="Strong")
    meta_schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    meta_schema.add_field("id", DataType.INT64, is_primary=True)
    meta_schema.add_field("meta", DataType.VARCHAR, max_length=65535)
    meta_schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
    meta_params = client.prepare_index_params()
    meta_params.add_index("unused", index_type="FLAT", metric_type="L2")
    client.create_collection("kprpe_gallery_meta", schema=meta_schema, index_params=meta_params)
    client.upsert("kprpe_gallery_meta", [{"id": 0, "meta": json.dumps({"dim": 32}), "unused": [0.0, 0.0]}])
    client.close()
    with DatabaseGallery.open(uri, dim=32) as gallery:
        assert not gallery.records_images  # Milvus cannot add a field to a collection: no record is kept
        for seed in (0, 1):
            gallery.write(_staged({"ann": [0]}, seed=seed), pool=True)
        assert gallery.count("ann") == 2 and gallery.image_records(["ann"])["ann"] == (frozenset(), 2)


@pytest.mark.parametrize("engine", [_engine("milvus", "pymilvus")])
def test_a_milvus_record_too_large_for_its_field_is_refused(engine, tmp_path):
    from kprpe.gallery.database import MILVUS_MAX_DIGESTS

    with DatabaseGallery.open(_uri(engine, tmp_path), dim=32) as gallery:
        gallery.write(_staged({"ann": list(range(MILVUS_MAX_DIGESTS))}), pool=False)  # the most that fit
        assert gallery.count("ann") == MILVUS_MAX_DIGESTS
        with pytest.raises(GalleryIndexError, match=f"at most {MILVUS_MAX_DIGESTS} per identity"):
            gallery.write(_staged({"ann": [MILVUS_MAX_DIGESTS]}), pool=True)
        assert gallery.count("ann") == MILVUS_MAX_DIGESTS  # nothing written
