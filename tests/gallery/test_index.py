"""GalleryIndex: FAISS and NumPy give the same exact ranking, pooling is the IJB mean, add/remove need no
rebuild, files are pickle-free and tied to one model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kprpe.errors import KprpeError
from kprpe.gallery.index import GalleryIndex, GalleryIndexError, exact_top_k, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")


def _unit(rng, n, dim=32):
    rows = rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _gallery(rng, identities=60, dim=32):
    return {f"id{i:03d}": _unit(rng, int(rng.integers(1, 4)), dim) for i in range(identities)}


@pytest.mark.parametrize("chunk_rows", [7, 64, 65536])
def test_exact_top_k_matches_a_stable_argsort_even_with_ties(chunk_rows):
    rng = np.random.default_rng(1)
    templates = _unit(rng, 50)
    templates[10] = templates[3]  # exact ties: the lower row must come first
    templates[40] = templates[3]
    queries = np.vstack([templates[3], _unit(rng, 4)])
    rows, scores = exact_top_k(queries, templates.astype(np.float32), 6, chunk_rows=chunk_rows)
    full = queries.astype(np.float64) @ templates.astype(np.float32).astype(np.float64).T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=0, atol=1e-15)
    assert list(rows[0, :3]) == [3, 10, 40]


def test_numpy_backend_pools_the_normalised_mean_and_ranks_like_exact_top_k():
    rng = np.random.default_rng(2)
    gallery = _gallery(rng)
    index = GalleryIndex(32, backend="numpy")
    index.add(gallery)
    names = list(gallery)
    means = np.stack([rows.mean(axis=0) for rows in gallery.values()])
    expected = means / np.linalg.norm(means, axis=1, keepdims=True)
    templates = np.stack([index.template(name) for name in names])
    np.testing.assert_allclose(templates, expected, rtol=0, atol=1e-7)  # float32 templates of unit rows
    queries = _unit(rng, 9).astype(np.float32)
    rows, scores = exact_top_k(queries, templates, 5)
    assert [[(h.identity, h.score) for h in row] for row in index.search(queries, k=5)] == [
        [(names[r], float(s)) for r, s in zip(row, score, strict=True)]
        for row, score in zip(rows, scores, strict=True)
    ]


@needs_faiss
def test_faiss_exact_and_numpy_fallback_rank_identically():
    rng = np.random.default_rng(3)
    gallery = _gallery(rng, identities=200)
    queries = _unit(rng, 25).astype(np.float32)
    results = {}
    for backend in ("faiss", "numpy"):
        index = GalleryIndex(32, backend=backend)
        index.add(gallery)
        assert index.kind == "exact"
        results[backend] = index.search(queries, k=10)
    for a, b in zip(results["faiss"], results["numpy"], strict=True):
        assert [h.identity for h in a] == [h.identity for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_templates_pool_the_mean_of_unit_embeddings_incrementally(backend):
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((5, 32)) * rng.uniform(0.5, 3.0, (5, 1))  # not unit: normalised on the way in
    index = GalleryIndex(32, backend=backend)
    index.add({"ann": rows[:2]})
    index.add({"bob": rows[4]})
    index.add({"ann": rows[2:4]})
    unit = rows[:4] / np.linalg.norm(rows[:4], axis=1, keepdims=True)
    expected = unit.mean(axis=0) / np.linalg.norm(unit.mean(axis=0))
    np.testing.assert_allclose(index.template("ann"), expected, atol=1e-6)
    assert index.count("ann") == 4 and index.count("bob") == 1
    hit = index.search(expected, k=1)[0][0]
    assert hit.identity == "ann" and hit.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_remove_and_re_add_without_rebuilding(backend, tmp_path):
    rng = np.random.default_rng(5)
    gallery = _gallery(rng, identities=20)
    index = GalleryIndex(32, backend=backend)
    index.add(gallery)
    target = index.template("id007")
    assert index.remove(["id007", "id011"]) == ["id007", "id011"]
    assert len(index) == 18 and "id007" not in index
    hits = index.search(target, k=20)[0]
    assert len(hits) == 18 and "id007" not in [h.identity for h in hits]
    with pytest.raises(GalleryIndexError, match="not in the index"):
        index.remove(["id007"])
    index.save(tmp_path / "gallery.npz")
    again = GalleryIndex.load(tmp_path / "gallery.npz", backend=backend)
    assert again.names == index.names
    index.add({"id007": target})
    assert index.search(target, k=1)[0][0].identity == "id007"


@needs_faiss
def test_ivf_above_the_threshold_survives_save_load_and_edits(tmp_path):
    rng = np.random.default_rng(6)
    gallery = _gallery(rng, identities=300)
    index = GalleryIndex(
        32, backend="faiss", approximate_above=250, nlist=8, nprobe=8
    )  # nprobe = nlist: exact
    index.add(gallery)
    assert index.describe()["kind"] == "ivf" and index.describe()["nlist"] == 8
    exact = GalleryIndex(32, backend="numpy")
    exact.add(gallery)
    queries = _unit(rng, 20).astype(np.float32)
    assert [[h.identity for h in r] for r in index.search(queries, 3)] == [
        [h.identity for h in r] for r in exact.search(queries, 3)
    ]
    index.remove(["id005"])
    index.add({"new": queries[0]})
    index.save(tmp_path / "ivf.npz")
    loaded = GalleryIndex.load(tmp_path / "ivf.npz")
    assert loaded.kind == "ivf" and len(loaded) == 300
    assert loaded.search(queries[0], 1)[0][0].identity == "new"
    assert "id005" not in [h.identity for h in loaded.search(exact.template("id005"), 300)[0]]
    numpy_view = GalleryIndex.load(tmp_path / "ivf.npz", backend="numpy")  # the fallback reads the same file
    assert numpy_view.search(queries[0], 1)[0][0].identity == "new"


def test_index_files_refuse_other_models_and_pickles(tmp_path):
    rng = np.random.default_rng(7)
    index = GalleryIndex(32, backend="numpy", metadata={"model_fingerprint": "a" * 64})
    index.add(_gallery(rng, identities=3))
    path = index.save(tmp_path / "g.npz")
    loaded = GalleryIndex.load(path)
    loaded.check_compatible("a" * 64, 32)
    with pytest.raises(GalleryIndexError, match="different weights"):
        loaded.check_compatible("b" * 64, 32)
    with pytest.raises(GalleryIndexError, match="512-d"):
        loaded.check_compatible("a" * 64, 512)
    evil = tmp_path / "evil.npz"
    np.savez(evil, metadata=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(GalleryIndexError, match="not a plain kprpe index"):
        GalleryIndex.load(evil)
    other = tmp_path / "other.npz"
    np.savez(other, metadata=np.asarray(json.dumps({"format": "something-else"})))
    with pytest.raises(GalleryIndexError, match="unknown format"):
        GalleryIndex.load(other)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(KprpeError, match="garbage.npz"):
        GalleryIndex.load(garbage)


def test_legacy_face_index_files_load_with_their_templates(tmp_path):
    rng = np.random.default_rng(8)
    templates = _unit(rng, 5).astype(np.float32)
    names = [f"id{i:03d}" for i in range(5)]
    metadata = {"format": "kprpe-face-index-v1", "model_fingerprint": "f" * 64}
    np.savez(  # the v1 layout the old FaceIndex wrote
        tmp_path / "v1.npz", identities=np.asarray(names), embeddings=templates,
        counts=np.array([1, 2, 1, 3, 1]), metadata=np.asarray(json.dumps(metadata)),
    )
    index = GalleryIndex.load(tmp_path / "v1.npz", backend="numpy")
    assert index.names == names and index.metadata["model_fingerprint"] == "f" * 64
    assert index.count("id003") == 3
    np.testing.assert_allclose(index.template("id002"), templates[2], atol=1e-6)
    np.savez(tmp_path / "twice.npz", identities=np.asarray(["a", "a"]), embeddings=templates[:2],
             counts=np.ones(2, np.int64), metadata=np.asarray(json.dumps(metadata)))
    with pytest.raises(GalleryIndexError, match="repeat"):
        GalleryIndex.load(tmp_path / "twice.npz", backend="numpy")


def test_bad_input_is_refused_before_anything_changes():
    index = GalleryIndex(4, backend="numpy")
    index.add({"ok": np.eye(4)[0]})
    with pytest.raises(GalleryIndexError, match="NaN"):
        index.add_embeddings(["new", "ok"], np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0]]))
    with pytest.raises(GalleryIndexError, match="zero norm"):
        index.add({"zero": np.zeros(4)})
    with pytest.raises(GalleryIndexError, match="names"):
        index.add({"": np.eye(4)[1]})
    with pytest.raises(GalleryIndexError, match=r"\(n, 4\)"):
        index.add({"wide": np.ones(5)})
    with pytest.raises(GalleryIndexError, match="4-d"):
        index.search(np.ones(5), 1)
    assert index.names == ["ok"] and index.count("ok") == 1
    with pytest.raises(GalleryIndexError, match="backend"):
        GalleryIndex(4, backend="annoy")
    with pytest.raises(GalleryIndexError, match="nprobe"):
        GalleryIndex(4, backend="numpy", nprobe=0)
    with pytest.raises(GalleryIndexError, match="approximate_above"):
        GalleryIndex(4, backend="numpy", approximate_above=-1)


def test_template_rows_are_the_rows_search_reports_and_read_only():
    rng = np.random.default_rng(9)
    index = GalleryIndex(32, backend="numpy")
    index.add(_gallery(rng, identities=6))
    index.remove(["id002"])
    rows = index.template_rows
    assert rows.shape == (6, 32) and not rows.flags.writeable
    found, _ = index.search_rows(rows[[4]], 1)
    assert found[0, 0] == 4
    np.testing.assert_array_equal(rows[5], index.template("id005"))


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_search_normalises_queries_so_scores_are_cosines(backend):
    # issue 31: raw (non-unit) queries scored -1.517 and 3.36 as "cosine"; a model's raw output is not unit
    rng = np.random.default_rng(5)
    index = GalleryIndex(16, backend=backend)
    index.add({f"id{i}": rng.standard_normal((2, 16)) for i in range(6)})
    raw = rng.standard_normal((4, 16)) * np.array([[0.01], [3.0], [40.0], [1.0]])
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    got = [[h.score for h in hits] for hits in index.search(raw, k=6)]
    cosines = unit @ index.template_rows.T.astype(np.float64)
    # float32 queries and templates: each cosine is within a few float32 ulps (6e-8) times dim of float64's
    np.testing.assert_allclose(got, -np.sort(-cosines, axis=1), atol=1e-5)
    with pytest.raises(GalleryIndexError, match="zero norm"):
        index.search(np.zeros(16), k=1)


def _digest(i: int) -> bytes:
    import hashlib

    return hashlib.sha256(f"image {i}".encode()).digest()


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_the_image_record_survives_save_load_and_goes_with_a_removed_identity(backend, tmp_path):
    rng = np.random.default_rng(11)
    index = GalleryIndex(32, backend=backend)
    index.add_embeddings(["ann", "ann", "bob"], _unit(rng, 3), digests=[_digest(0), _digest(1), _digest(0)])
    index.add({"cid": _unit(rng, 2)})  # pooled without digests: two unknown images
    with pytest.raises(GalleryIndexError, match="already pooled"):  # the same image twice in one identity
        index.add_embeddings(["ann"], _unit(rng, 1), digests=[_digest(1)])
    with pytest.raises(GalleryIndexError, match="already pooled"):  # within one call too
        index.add_embeddings(["bob", "bob"], _unit(rng, 2), digests=[_digest(5), _digest(5)])
    with pytest.raises(GalleryIndexError, match="32-byte"):
        index.add_embeddings(["bob"], _unit(rng, 1), digests=[b"short"])
    assert index.count("ann") == 2 and index.count("bob") == 1  # refused before anything changed
    index.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as data:
        assert data["image_digests"].shape == (3, 32) and data["image_digest_slots"].tolist() == [0, 0, 1]
    loaded = GalleryIndex.load(tmp_path / "g.npz", backend=backend)
    assert loaded.image_records(["ann", "bob", "cid", "nobody"]) == {
        "ann": (frozenset({_digest(0), _digest(1)}), 2),
        "bob": (frozenset({_digest(0)}), 1),
        "cid": (frozenset(), 2),
    }
    loaded.add_embeddings(["ann"], _unit(rng, 1), digests=[_digest(2)])  # the file's record and a new one
    assert loaded.image_records(["ann"])["ann"] == (frozenset({_digest(i) for i in range(3)}), 3)
    loaded.remove(["ann"])
    loaded.save(tmp_path / "g.npz")
    again = GalleryIndex.load(tmp_path / "g.npz", backend=backend)
    assert again.image_records(["ann", "bob"]) == {"bob": (frozenset({_digest(0)}), 1)}
    again.add_embeddings(["ann"], _unit(rng, 1), digests=[_digest(0)])  # enrolled anew: not "already pooled"
    assert again.image_records(["ann"])["ann"] == (frozenset({_digest(0)}), 1)


def test_a_damaged_image_record_is_refused(tmp_path):
    rng = np.random.default_rng(12)
    index = GalleryIndex(32, backend="numpy")
    index.add_embeddings(["ann", "bob"], _unit(rng, 2), digests=[_digest(0), _digest(1)])
    index.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for change, message in (
        ({"image_digest_slots": np.array([0, 7])}, "not in it"),
        ({"image_digest_slots": np.array([0, 0])}, "more images than its image count"),
        ({"image_digests": np.zeros((2, 16), np.uint8)}, r"\(M, 32\) uint8"),
        ({"image_digest_slots": None}, "come together"),
    ):
        damaged = {k: v for k, v in {**arrays, **change}.items() if v is not None}
        with open(tmp_path / "bad.npz", "wb") as stream:
            np.savez(stream, **damaged)
        with pytest.raises(GalleryIndexError, match=message):
            GalleryIndex.load(tmp_path / "bad.npz")
