"""Embedding, verification and search with the reference vectors' tiny weights (plumbing, not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kprpe.face import (
    FaceEmbedder,
    FacePipeline,
    NoFaceFound,
    align_face,
    verify,
)
from kprpe.gallery.index import GalleryIndex, GalleryIndexError, enrol_gallery
from kprpe.keypoints import flip_keypoints

from .conftest import TINY_WEIGHTS

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def astronaut_face(astronaut, astronaut_detection):
    return align_face(astronaut, astronaut_detection.keypoints)


def test_embedding_is_unit_with_norm_and_flip_sum(embedder, astronaut_face):
    unit, norms = embedder.embed_faces([astronaut_face])
    assert unit.shape == (1, 32) and norms.shape == (1,)
    assert np.linalg.norm(unit[0]) == pytest.approx(1.0, abs=1e-5)
    # flip TTA by hand: raw(original) + raw(mirror with keypoints mirrored and 0<->1, 3<->4 swapped)
    image = torch.from_numpy(astronaut_face.image).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    keypoints = torch.from_numpy(astronaut_face.keypoints[None]).float()
    with torch.no_grad():
        raw = embedder.model(image, keypoints) + embedder.model(
            image.flip(-1), flip_keypoints(keypoints, 112)
        )
    np.testing.assert_allclose(norms[0], raw.norm().item(), rtol=1e-5)
    np.testing.assert_allclose(unit[0], (raw / raw.norm())[0].numpy(), atol=1e-5)
    no_flip = FaceEmbedder(embedder.model, flip=False)
    assert not np.allclose(no_flip.embed_faces([astronaut_face])[0], unit, atol=1e-4)


def test_batched_equals_one_by_one(embedder, astronaut, astronaut_detection):
    faces = [align_face(astronaut, astronaut_detection.keypoints + shift) for shift in (0, 3, -5, 8, 1)]
    small_batches = FaceEmbedder(embedder.model, batch_size=2)
    together, norms = small_batches.embed_faces(faces)
    for i, face in enumerate(faces):
        single, single_norm = embedder.embed_faces([face])
        np.testing.assert_allclose(together[i], single[0], atol=1e-5)
        np.testing.assert_allclose(norms[i], single_norm[0], rtol=1e-5)
    empty, empty_norms = embedder.embed_faces([])
    assert empty.shape == (0, 32) and empty_norms.shape == (0,)


def test_embed_crops_validates_shapes(embedder):
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed_crops(np.zeros((1, 112, 112, 3), np.float32), np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="keypoints"):
        embedder.embed_crops(np.zeros((2, 112, 112, 3), np.uint8), np.zeros((1, 5, 2)))


def test_embedder_rejects_models_of_other_input_size():
    from kprpe import create_model

    with pytest.raises(ValueError, match="expects 224"):
        FaceEmbedder(create_model("vit_tiny_kprpe", img_size=224, patch_size=16, depth=1))


def test_verify_photo_with_itself_is_one(dlib_detector, embedder, photo_dir):
    pipeline = FacePipeline(dlib_detector)
    result = verify(
        photo_dir / "astronaut.png", photo_dir / "astronaut.png", pipeline=pipeline, embedder=embedder
    )
    assert result.similarity == pytest.approx(1.0, abs=1e-6)
    assert result.same is True
    assert set(result.to_dict()) >= {"similarity", "same", "threshold", "norms"}


def test_verify_reports_missing_face(dlib_detector, embedder, photo_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (120, 90), (90, 90, 90)).save(tmp_path / "wall.png")
    with pytest.raises(NoFaceFound, match="wall.png: no face found"):
        verify(
            photo_dir / "astronaut.png",
            tmp_path / "wall.png",
            pipeline=FacePipeline(dlib_detector),
            embedder=embedder,
        )


def test_batch_reports_failures_and_continues(dlib_detector, photo_dir, tmp_path):
    from PIL import Image

    Image.new("L", (64, 64), 30).save(tmp_path / "dark.png")
    (tmp_path / "readme.txt").write_text("not an image")
    batch = FacePipeline(dlib_detector).process(
        [photo_dir, tmp_path / "dark.png", tmp_path / "readme.txt", tmp_path / "missing.jpg"], progress=False
    )
    assert [r.source.split("/")[-1] for r in batch.records] == ["astronaut.png", "tilted.jpg"]
    reasons = {path.split("/")[-1]: reason for path, reason in batch.failures}
    assert set(reasons) == {"dark.png", "readme.txt", "missing.jpg"}
    assert (
        "no face" in reasons["dark.png"]
        and "not an image" in reasons["readme.txt"]
        and "no such file" in reasons["missing.jpg"]
    )


def test_index_enrol_save_load_search(dlib_detector, embedder, astronaut, tmp_path):
    from PIL import Image

    gallery = tmp_path / "gallery"
    (gallery / "eileen").mkdir(parents=True)
    (gallery / "nobody").mkdir()
    Image.fromarray(astronaut).save(gallery / "eileen" / "1.png")
    Image.fromarray(astronaut[::-1].copy()).save(gallery / "eileen" / "upside_down.png")  # no face: reported
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(
        gallery / "mirror.png"
    )  # loose image: identity "mirror"
    Image.new("RGB", (100, 100)).save(gallery / "nobody" / "black.png")
    pipeline = FacePipeline(dlib_detector, all_faces=True)  # enrolment keeps only the largest face
    index = GalleryIndex(
        embedder.output_dim, metadata={"model_fingerprint": embedder.fingerprint}, backend="numpy"
    )
    failures = enrol_gallery(index, gallery, pipeline=pipeline, embedder=embedder, progress=False)
    assert index.names == ["eileen", "mirror"]
    assert [index.count(name) for name in index.names] == [1, 1]
    failed = {p.split("/")[-1] for p, _ in failures}
    assert failed == {"upside_down.png", "black.png", "nobody"}
    saved = index.save(tmp_path / "index.npz")
    np.load(saved, allow_pickle=False).close()  # plain arrays only
    loaded = GalleryIndex.load(saved, backend="numpy")
    np.testing.assert_array_equal(loaded.template("eileen"), index.template("eileen"))
    loaded.check_compatible(embedder.fingerprint, embedder.output_dim)
    [face] = FacePipeline(dlib_detector).faces_in_image(astronaut)
    unit, _ = embedder.embed_faces([face])
    [hits] = loaded.search(unit, k=5)
    assert [h.identity for h in hits][0] == "eileen" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 2 and hits[0].score >= hits[1].score


def test_index_refuses_other_weights_and_bad_files(embedder, tmp_path):
    from kprpe import load_official

    index = GalleryIndex(32, metadata={"model_fingerprint": embedder.fingerprint}, backend="numpy")
    index.add({"a": np.eye(32, dtype=np.float32)[:1]})
    other = load_official(TINY_WEIGHTS)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(GalleryIndexError, match="different weights"):
        index.check_compatible(FaceEmbedder(other).fingerprint)
    index.check_compatible(embedder.fingerprint)
    np.savez(tmp_path / "evil.npz", identities=np.array([object()], dtype=object))
    with pytest.raises(GalleryIndexError, match="not a plain kprpe index"):
        GalleryIndex.load(tmp_path / "evil.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(GalleryIndexError):
        GalleryIndex.load(tmp_path / "junk.npz")
    with pytest.raises(GalleryIndexError, match="does not exist"):
        GalleryIndex.load(tmp_path / "none.npz")
    # truncated and CRC-corrupt files, metadata of the wrong type: clear errors, not tracebacks
    saved = index.save(tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(saved[: len(saved) // 2])
    with pytest.raises(GalleryIndexError, match="cut.npz"):
        GalleryIndex.load(tmp_path / "cut.npz")
    flipped = bytearray(saved)
    flipped[saved.index(b"templates.npy") + 200] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    with pytest.raises(GalleryIndexError, match="crc.npz"):
        GalleryIndex.load(tmp_path / "crc.npz")
    np.savez(tmp_path / "list.npz", identities=np.array(["a"]), embeddings=np.zeros((1, 32), np.float32),
             counts=np.ones(1), metadata=np.asarray("[1, 2]"))
    with pytest.raises(GalleryIndexError, match="no metadata object"):
        GalleryIndex.load(tmp_path / "list.npz")


def test_embedder_takes_as_many_keypoints_as_the_model_was_built_for():
    from kprpe import create_model

    model = create_model("vit_tiny_kprpe", num_keypoints=3, depth=1)
    with pytest.raises(ValueError, match="flip_permutation"):
        FaceEmbedder(model)  # which of 3 points are left/right is not known
    embedder = FaceEmbedder(model, flip_permutation=(1, 0, 2))
    assert embedder.num_keypoints == 3
    unit, _ = embedder.embed_crops(np.zeros((2, 112, 112, 3), np.uint8), np.full((2, 3, 2), 0.5))
    assert unit.shape == (2, embedder.output_dim)
    with pytest.raises(ValueError, match=r"takes 3 keypoints"):
        embedder.embed_crops(np.zeros((1, 112, 112, 3), np.uint8), np.zeros((1, 5, 2)))


def test_iter_batches_yields_chunks_in_order_and_process_joins_them(dlib_detector, photo_dir, tmp_path):
    (tmp_path / "readme.txt").write_text("not an image")
    inputs = [photo_dir, tmp_path / "readme.txt"]
    pipeline = FacePipeline(dlib_detector, batch_size=2)
    parts = list(pipeline.iter_batches(inputs, progress=False))
    names = [[r.source.split("/")[-1] for r in p.records] for p in parts]
    assert names == [["astronaut.png", "tilted.jpg"], []]
    assert [p.split("/")[-1] for part in parts for p, _ in part.failures] == ["readme.txt"]
    whole = pipeline.process(inputs, progress=False)
    assert [r.name for r in whole.records] == [r.name for p in parts for r in p.records]
    assert whole.failures == [f for p in parts for f in p.failures]
