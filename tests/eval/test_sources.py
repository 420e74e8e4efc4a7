from __future__ import annotations

import cv2
import numpy as np
import pytest

from kprpe.eval.binfile import read_verification_bin, write_verification_bin
from kprpe.eval.embedding import EmbeddingCache, FaceSource, embed_with_cache
from kprpe.eval.landmarks import (
    LandmarkFileError,
    face_backend_available,
    read_normalized_landmark_csv,
    read_pixel_landmarks,
)
from kprpe.eval.verification import bin_face_source, resolve_keypoint_source
from kprpe.keypoints import ARCFACE_TEMPLATE_112
from kprpe.nn import load_official

from .conftest import TINY_KPRPE


def _random_source(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    kps = np.tile(ARCFACE_TEMPLATE_112 / 112, (n, 1, 1))
    return FaceSource(count=n, load=lambda a, b: (images[a:b], kps[a:b]), fingerprint=f"random:{seed}")


def test_cache_round_trip_and_damaged_entry(tmp_path):
    calls = []

    def loader():
        calls.append(1)
        return load_official(TINY_KPRPE)

    src = _random_source()
    emb, norms, cached = embed_with_cache(
        loader, TINY_KPRPE, src, mode="m", cache_dir=tmp_path, progress=False, batch_size=4
    )
    assert not cached and emb.shape == (6, 32) and len(calls) == 1
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    emb2, norms2, cached2 = embed_with_cache(
        loader, TINY_KPRPE, src, mode="m", cache_dir=tmp_path, progress=False
    )
    assert cached2 and len(calls) == 1  # the model was not even loaded
    np.testing.assert_array_equal(emb, emb2)
    # no pickle inside: the entry loads with allow_pickle=False
    (entry,) = tmp_path.glob("*.npz")
    with np.load(entry, allow_pickle=False) as data:
        assert set(data.files) == {"embeddings", "norms", "meta"}
    entry.write_bytes(b"garbage")
    _, _, cached3 = embed_with_cache(loader, TINY_KPRPE, src, mode="m", cache_dir=tmp_path, progress=False)
    assert not cached3 and len(calls) == 2
    # another mode or no flip is another entry
    assert EmbeddingCache.make_key(a=1, mode="x") != EmbeddingCache.make_key(a=1, mode="y")


def test_landmark_file_errors(tmp_path):
    f = tmp_path / "lm.csv"
    f.write_text(
        "idx,"
        + ",".join(f"ldmk_{i}" for i in range(10))
        + "\n0,"
        + ",".join(["0.5"] * 10)
        + "\n0,"
        + ",".join(["0.5"] * 10)
        + "\n"
    )
    with pytest.raises(LandmarkFileError, match=r"lm\.csv:3: index 0 appears twice"):
        read_normalized_landmark_csv(f)
    f.write_text("0," + ",".join(["50"] * 10) + "\n")
    with pytest.raises(LandmarkFileError, match="not normalised"):
        read_normalized_landmark_csv(f)
    p = tmp_path / "px.txt"
    p.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\nb.jpg 1 2 3\n")
    with pytest.raises(LandmarkFileError, match=r"px\.txt:2: expected 'name x0 y0"):
        read_pixel_landmarks(p)
    p.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10\n")
    points, scores = read_pixel_landmarks(p)
    assert points["a.jpg"].shape == (5, 2) and scores["a.jpg"] == 1.0


def test_keypoint_source_resolution(tmp_path):
    assert resolve_keypoint_source("auto", tmp_path / "x.csv") == "file"
    assert resolve_keypoint_source("template", None) == "template"
    with pytest.raises(ValueError, match="needs a landmark file"):
        resolve_keypoint_source("file", None)


def _tiny_bin(tmp_path, n_pairs=2):
    rng = np.random.default_rng(0)
    images = [
        cv2.imencode(".png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
        for _ in range(2 * n_pairs)
    ]
    path = tmp_path / "t.bin"
    write_verification_bin(path, images, [True, False][:n_pairs])
    return path


def test_bin_source_with_missing_landmarks_is_refused(tmp_path):
    path = _tiny_bin(tmp_path)
    lm = tmp_path / "lm.csv"
    lm.write_text("0," + ",".join(["0.5"] * 10) + "\n")
    with pytest.raises(ValueError, match="no landmarks for 3 of 4 images"):
        bin_face_source(read_verification_bin(path), path, "file", lm)


@pytest.mark.skipif(not face_backend_available(), reason="kprpe.face / dlib not installed")
def test_bin_source_with_face_backend(tmp_path):
    path = _tiny_bin(tmp_path)
    source = bin_face_source(read_verification_bin(path), path, "backend")
    images, kps = source.load(0, 2)
    assert images.shape == (2, 112, 112, 3) and kps.shape == (2, 5, 2)
    assert np.all(np.isfinite(kps)) and np.all(np.abs(kps - ARCFACE_TEMPLATE_112 / 112) < 0.2)


def test_cache_is_keyed_on_the_bytes_that_define_the_model(tmp_path):
    """Replacing the weights (or the config beside them) with other bytes of the same size and time stamp must
    not serve the old model's embeddings."""
    import os
    import shutil

    repo = tmp_path / "repo" / "pretrained_model"
    repo.mkdir(parents=True)
    weights = repo / "model.safetensors"
    shutil.copy(TINY_KPRPE, weights)
    config = tmp_path / "repo" / "config.json"
    config.write_text('{"note": "a"}')
    src = _random_source()
    _, _, cached = embed_with_cache(
        lambda: load_official(weights), weights, src, mode="m", cache_dir=tmp_path / "c", progress=False
    )
    assert not cached
    stamp = weights.stat().st_mtime_ns
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stamp, stamp))
    _, _, cached = embed_with_cache(
        lambda: load_official(weights), weights, src, mode="m", cache_dir=tmp_path / "c", progress=False
    )
    assert not cached
    config.write_text('{"note": "b"}')  # a config that belongs to the checkpoint is part of the model
    _, _, cached = embed_with_cache(
        lambda: load_official(weights), weights, src, mode="m", cache_dir=tmp_path / "c", progress=False
    )
    assert not cached
    _, _, cached = embed_with_cache(
        lambda: load_official(weights), weights, src, mode="m", cache_dir=tmp_path / "c", progress=False
    )
    assert cached
