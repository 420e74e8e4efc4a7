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
