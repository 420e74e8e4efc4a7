"""``kprpe search enrol|query|remove`` on the FAISS/NumPy gallery index, and calibrated thresholds in
``kprpe verify`` / ``kprpe search query``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kprpe.gallery.index import faiss_available

from .conftest import run_cli

pytest.importorskip("dlib")
run = run_cli


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import kprpe

    folder = tmp_path_factory.mktemp("weights")
    return {
        name: kprpe.save_model(kprpe.create_model("vit_tiny_kprpe"), folder / f"{name}.safetensors")
        for name in ("a", "b")
    }


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("gallery")
    for name, image in (("eileen", astronaut), ("mirror", np.ascontiguousarray(astronaut[:, ::-1]))):
        (root / name).mkdir()
        Image.fromarray(image).save(root / name / "1.png")
    (root / "extra" / "eileen").mkdir(parents=True)
    Image.fromarray(astronaut).rotate(8, resample=Image.BILINEAR).save(root / "extra" / "eileen" / "2.png")
    return root


@pytest.mark.parametrize(
    "backend",
    [
        "numpy",
        pytest.param(
            "faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
        ),
    ],
)
def test_enrol_append_query_remove(capsys, tmp_path, gallery, astronaut, tiny_weights, backend):
    index = tmp_path / "gallery.npz"
    w = tiny_weights["a"]
    code, out, _ = run(
        capsys, "search", "enrol", gallery, "-o", index, "--weights", w, "--backend", backend, "-q"
    )
    assert (
        code == 0 and out["identities"] == 2 and out["index"]["backend"] == backend
    )  # extra/ holds no images
    code, out, _ = run(
        capsys,
        "search",
        "enrol",
        gallery / "extra",
        "-o",
        index,
        "--append",
        "--weights",
        w,
        "--backend",
        backend,
        "-q",
    )
    assert code == 0 and out["identities"] == 2
    from kprpe.gallery.index import GalleryIndex

    assert GalleryIndex.load(index, backend=backend).count("eileen") == 2  # pooled a second image
    photo = tmp_path / "probe.png"
    Image.fromarray(astronaut).save(photo)
    code, out, _ = run(
        capsys,
        "search",
        "query",
        photo,
        "--index",
        index,
        "--weights",
        w,
        "-k",
        "2",
        "--backend",
        backend,
        "-q",
    )
    assert code == 0 and out["threshold_source"].startswith("default")
    [result] = out["results"]
    assert [m["identity"] for m in result["matches"]][0] == "eileen"
    assert all(m["same"] == (m["score"] >= out["threshold"]) for m in result["matches"])
    code, out, _ = run(capsys, "search", "remove", "eileen", "--index", index, "--backend", backend)
    assert code == 0 and out["removed"] == ["eileen"] and out["identities"] == 1
    code, out, _ = run(capsys, "search", "query", photo, "--index", index, "--weights", w, "-k", "5", "-q")
    assert "eileen" not in [m["identity"] for m in out["results"][0]["matches"]]
    code, _, err = run(capsys, "search", "remove", "nobody", "--index", index)
    assert code == 2 and "nobody" in err


def test_query_with_other_weights_is_refused(capsys, tmp_path, gallery, astronaut, tiny_weights):
    index = tmp_path / "g.npz"
    assert run(capsys, "search", "enrol", gallery, "-o", index, "--weights", tiny_weights["a"], "-q")[0] == 0
    photo = tmp_path / "probe.png"
    Image.fromarray(astronaut).save(photo)
    code, out, err = run(
        capsys, "search", "query", photo, "--index", index, "--weights", tiny_weights["b"], "-q"
    )
    assert code == 2 and out is None and "different weights" in err


def test_verify_and_search_use_the_calibration_beside_the_weights(
    capsys, tmp_path, gallery, astronaut, tiny_weights
):
    from kprpe.eval.calibration import calibration_path, write_calibration
    from kprpe.face import FaceEmbedder

    w = tiny_weights["b"]
    photo = tmp_path / "probe.png"
    Image.fromarray(astronaut).save(photo)
    code, out, _ = run(capsys, "verify", photo, photo, "--weights", w, "-q")
    assert code == 0 and out["threshold"] == 0.3 and out["threshold_source"].startswith("default")
    fingerprint = FaceEmbedder.from_weights(w).fingerprint
    cal = dict(
        far_target=1e-3, far=1e-3, threshold=0.42, tar=0.9, num_genuine=10, num_impostor=1000, rule="test"
    )
    write_calibration(w, cal, model_fingerprint=fingerprint, dataset="toy", protocol="pairs", flip=True)
    code, out, _ = run(capsys, "verify", photo, photo, "--weights", w, "-q")
    assert code == 0 and out["threshold"] == 0.42 and str(calibration_path(w)) in out["threshold_source"]
    assert out["same"] is True  # the same photo: similarity 1
    code, out, _ = run(capsys, "verify", photo, photo, "--weights", w, "--threshold", "1.5", "-q")
    assert out["threshold"] == 1.5 and out["threshold_source"] == "--threshold" and out["same"] is False
    code, out, _ = run(capsys, "verify", photo, photo, "--weights", w, "--no-flip", "-q")
    assert out["threshold"] == 0.3 and "flip" in out["threshold_source"]
    index = tmp_path / "g.npz"
    assert run(capsys, "search", "enrol", gallery, "-o", index, "--weights", w, "-q")[0] == 0
    code, out, _ = run(capsys, "search", "query", photo, "--index", index, "--weights", w, "-q")
    assert out["threshold"] == 0.42 and "calibration" in out["threshold_source"]


def test_enrol_thumbnails_for_the_page(capsys, tmp_path, gallery, astronaut, tiny_weights):
    from kprpe.gallery.thumbnails import ThumbnailStore, thumbnails_beside

    index = tmp_path / "gallery.npz"
    store = ThumbnailStore(thumbnails_beside(index))
    common = ("--weights", tiny_weights["a"], "--backend", "numpy", "-q")
    code, out, _ = run(capsys, "search", "enrol", gallery, "-o", index, "--thumbnails", *common)
    assert code == 0 and out["thumbnails_written"] == 2 and out["thumbnails"] == str(store.folder)
    assert store.numbers("eileen") == [0] and store.numbers("mirror") == [0]
    # the first usable face of the identity, as the pipeline crops it (JPEG of a 56x56 resize: see the store)
    from kprpe.face import FacePipeline

    crop = FacePipeline().faces_in_image(astronaut)[0].image
    thumb = np.asarray(Image.open(store.folder / store.key("eileen") / "0.jpg"))
    expected = np.asarray(Image.fromarray(crop).resize((56, 56), Image.LANCZOS))
    # JPEG quality 90 moves a 56x56 face about 3 grey levels on average (3.3 measured in
    # tests/serve/test_page.py); another picture is tens away
    assert np.abs(thumb.astype(float) - expected.astype(float)).mean() < 6
    more = tmp_path / "more"
    (more / "new").mkdir(parents=True)
    Image.fromarray(astronaut).save(more / "new" / "1.png")
    code, out, _ = run(capsys, "search", "enrol", more, "-o", index, "--append", "--thumbnails", *common)
    assert code == 0 and out["thumbnails_written"] == 1 and store.numbers("eileen") == [0]
    assert run(capsys, "search", "remove", "new", "--index", index)[0] == 0
    assert store.numbers("new") == [] and store.numbers("mirror") == [0]
    # a replaced index takes its thumbnails with it
    code, out, _ = run(capsys, "search", "enrol", more, "-o", index, "--overwrite", *common)
    assert code == 0 and "thumbnails" not in out and not store.folder.exists()


def _engine(name: str):
    module = {"milvus": "pymilvus", "qdrant": "qdrant_client"}[name]
    return pytest.param(name, marks=pytest.mark.skipif(not _importable(module), reason=f"{module} missing"))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("engine", [_engine("milvus"), _engine("qdrant")])
def test_gallery_uri_gives_the_file_index_answers(capsys, tmp_path, gallery, astronaut, tiny_weights, engine):
    uri = f"milvus://{tmp_path / 'g.db'}" if engine == "milvus" else f"qdrant://{tmp_path / 'g_qdrant'}"
    index, w = tmp_path / "g.npz", tiny_weights["a"]
    photo = tmp_path / "probe.png"
    Image.fromarray(astronaut).save(photo)
    for target in (("-o", index), ("--gallery", uri)):
        assert run(capsys, "search", "enrol", gallery, *target, "--weights", w, "-q")[0] == 0
        code, out, _ = run(
            capsys, "search", "enrol", gallery / "extra", *target, "--append", "--weights", w, "-q"
        )
        assert code == 0 and out["identities"] == 2
    assert out["index"]["backend"] == engine and out["enrolled"] == 1
    answers = {}
    for target in (("--index", index), ("--gallery", uri)):
        code, out, _ = run(capsys, "search", "query", photo, *target, "--weights", w, "-k", "2", "-q")
        assert code == 0
        answers[target[0]] = [(m["identity"], m["score"]) for m in out["results"][0]["matches"]]
    assert [name for name, _ in answers["--gallery"]] == [name for name, _ in answers["--index"]]
    # the same float32 templates and query; FAISS/NumPy and the database each sum 512 float32 products
    # (relative error about 512 x 6e-8 = 3e-5)
    np.testing.assert_allclose(
        [s for _, s in answers["--gallery"]], [s for _, s in answers["--index"]], atol=1e-4
    )
    # another model's gallery is refused, on query and on enrolment, before anything is written
    for argv in (("query", photo), ("enrol", gallery, "--append")):
        code, out, err = run(capsys, "search", *argv, "--gallery", uri, "--weights", tiny_weights["b"], "-q")
        assert code == 2 and out is None and "different weights" in err
    code, out, _ = run(capsys, "search", "remove", "eileen", "--gallery", uri)
    assert code == 0 and out["removed"] == ["eileen"] and out["identities"] == 1
    code, _, err = run(capsys, "search", "remove", "nobody", "--gallery", uri)
    assert code == 2 and "nobody" in err
    with pytest.raises(SystemExit):  # --index is the old spelling of --gallery: one gallery, given once
        run(capsys, "search", "query", photo, "--gallery", uri, "--index", index, "--weights", w)
    assert "give it once" in capsys.readouterr().err
    code, _, err = run(capsys, "search", "query", photo, "--gallery", "redis://h/x", "--weights", w)
    assert code == 2 and "unknown scheme" in err
    # --overwrite drops the database gallery and enrols afresh (also for an engine that allows one handle)
    code, out, _ = run(
        capsys, "search", "enrol", gallery, "--gallery", uri, "--overwrite", "--weights", w, "-q"
    )
    assert code == 0 and out["identities"] == 2 and out["enrolled"] == 2


def _gallery_target(engine: str, tmp_path) -> tuple[str, str]:
    if engine == "file":
        return "--gallery", str(tmp_path / "g.npz")
    if engine == "milvus":
        return "--gallery", f"milvus://{tmp_path / 'g.db'}"
    return "--gallery", f"qdrant://{tmp_path / 'g_qdrant'}"


def _state(target: str) -> dict:
    from kprpe.gallery.database import open_gallery

    gallery = open_gallery(target, backend="numpy")
    try:
        return {name: (gallery.count(name), gallery.template(name)) for name in gallery.names}
    finally:
        getattr(gallery, "close", lambda: None)()


@pytest.mark.parametrize("engine", ["file", _engine("milvus"), _engine("qdrant")])
def test_append_skips_images_already_pooled(capsys, tmp_path, gallery, tiny_weights, engine, monkeypatch):
    """Re-running `enrol --append FOLDER` (an interrupted run, a cron job over a growing folder) adds nothing:
    an image is known by its content, so a renamed copy is skipped too, before it is embedded; the same
    image under another identity is that identity's image; a new image is pooled."""
    import shutil

    import kprpe.streaming.stream as stream

    option, target = _gallery_target(engine, tmp_path)
    common = ("--weights", tiny_weights["a"], "--backend", "numpy", "-q")
    assert run(capsys, "search", "enrol", gallery, option, target, *common)[0] == 0
    code, out, _ = run(capsys, "search", "enrol", gallery / "extra", option, target, "--append", *common)
    assert code == 0 and out["enrolled"] == 1 and out["already_pooled"] == 0
    before = _state(target)
    file_bytes = (tmp_path / "g.npz").read_bytes() if engine == "file" else None
    embedded = []
    real = stream.stream_embeddings
    monkeypatch.setattr(
        stream, "stream_embeddings", lambda inputs, **kw: embedded.extend(inputs) or real(inputs, **kw)
    )
    code, out, err = run(capsys, "search", "enrol", gallery / "extra", option, target, "--append", *common)
    assert code == 0 and out["already_pooled"] == 1 and out["enrolled"] == 0 and out["images"] == 0
    assert embedded == [] and "notice" not in err  # skipped before embedding; nothing unknown
    after = _state(target)
    assert (
        {n: c for n, (c, _) in after.items()}
        == {n: c for n, (c, _) in before.items()}
        == {
            "eileen": 2,
            "mirror": 1,
        }
    )
    for name in before:
        np.testing.assert_array_equal(after[name][1], before[name][1])
    if engine == "file":
        assert (tmp_path / "g.npz").read_bytes() == file_bytes  # bit-identical: not even rewritten
    # a renamed, moved copy is the same image; under another identity it is that identity's new image; a
    # really new image is pooled
    more = tmp_path / "more"
    for folder in ("eileen", "mirror"):
        (more / folder).mkdir(parents=True)
    shutil.copy(gallery / "extra" / "eileen" / "2.png", more / "eileen" / "renamed.png")
    shutil.copy(gallery / "eileen" / "1.png", more / "eileen" / "first_again.png")
    shutil.copy(gallery / "extra" / "eileen" / "2.png", more / "mirror" / "not_mirror.png")
    Image.open(gallery / "mirror" / "1.png").rotate(-8).save(more / "eileen" / "3.png")
    code, out, _ = run(capsys, "search", "enrol", more, option, target, "--append", *common)
    assert code == 0 and out["already_pooled"] == 2 and out["images"] == 2 and out["enrolled"] == 2
    assert [str(p) for p in embedded] == [
        str(more / "eileen" / "3.png"),
        str(more / "mirror" / "not_mirror.png"),
    ]
    counts = {n: c for n, (c, _) in _state(target).items()}
    assert counts == {"eileen": 3, "mirror": 2}
    # remove drops the identity's record with it: enrolled again, its images are new
    assert run(capsys, "search", "remove", "eileen", option, target)[0] == 0
    code, out, _ = run(capsys, "search", "enrol", gallery / "extra", option, target, "--append", *common)
    assert code == 0 and out["already_pooled"] == 0 and out["enrolled"] == 1
    assert _state(target)["eileen"][0] == 1


def test_append_to_an_index_without_a_record(capsys, tmp_path, gallery, tiny_weights):
    """An index written before identities recorded their images loads and appends; its images are unknown
    (pooled again if given again), which one notice says; what this run pools is recorded from now on."""
    index = tmp_path / "old.npz"
    common = ("--weights", tiny_weights["a"], "--backend", "numpy", "-q")
    assert run(capsys, "search", "enrol", gallery, "-o", index, *common)[0] == 0
    with np.load(index, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("image_digest")}
    assert len(arrays) == 5
    with open(index, "wb") as stream:
        np.savez(stream, **arrays)
    code, out, err = run(capsys, "search", "enrol", gallery, "-o", index, "--append", *common)
    assert code == 0 and out["already_pooled"] == 0 and out["images"] == 2
    assert err.count("notice") == 1 and "2 identities" in err and "2 images pooled without a record" in err
    from kprpe.gallery.index import GalleryIndex

    loaded = GalleryIndex.load(index)
    assert loaded.count("eileen") == 2  # the unknown first image was pooled again: what the notice warns of
    digests, count = loaded.image_records(["eileen"])["eileen"]
    assert (len(digests), count) == (1, 2)
    code, out, err = run(capsys, "search", "enrol", gallery, "-o", index, "--append", *common)
    assert code == 0 and out["already_pooled"] == 2 and out["images"] == 0  # recorded from then on
    assert err.count("notice") == 1  # still one unknown image each
