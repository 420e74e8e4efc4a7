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
