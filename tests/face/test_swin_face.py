"""The face commands (``embed``, ``verify``, ``search``) with a Swin-KP-RPE checkpoint (the official tiny
reference weights: 112 x 112 input, 5 keypoints, like the ViT's)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kprpe.face import FaceEmbedder, FacePipeline

from .conftest import DATA, run_cli

pytest.importorskip("dlib")
SWIN = str(DATA / "swin_kprpe" / "tiny_swin_kprpe.safetensors")


def test_embed_verify_search_with_swin(capsys, photo_dir, tmp_path, astronaut, dlib_detector):
    code, payload, _ = run_cli(capsys, "embed", photo_dir, "--weights", SWIN, "-o", tmp_path / "e.npz", "-q")
    assert code == 0 and payload["embedded"] == 2 and payload["dim"] == 32
    batch = FacePipeline(dlib_detector).process([photo_dir], progress=False)
    unit, _ = FaceEmbedder.from_weights(SWIN).embed_faces([r.face for r in batch.records])
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        np.testing.assert_allclose(data["embeddings"], unit, atol=1e-6)

    photo = photo_dir / "astronaut.png"
    code, payload, _ = run_cli(capsys, "verify", photo, photo, "--weights", SWIN)
    assert code == 0 and payload["similarity"] == pytest.approx(1.0, abs=1e-6)

    gallery = tmp_path / "gallery" / "eileen"
    gallery.mkdir(parents=True)
    Image.fromarray(astronaut).save(gallery / "a.png")
    code, payload, _ = run_cli(
        capsys, "search", "enrol", gallery.parent, "--weights", SWIN, "-o", tmp_path / "idx.npz", "-q"
    )
    assert code == 0 and payload["identities"] == 1
    code, payload, _ = run_cli(
        capsys, "search", "query", photo, "--index", tmp_path / "idx.npz", "--weights", SWIN, "-q"
    )
    assert code == 0 and payload["results"][0]["matches"][0]["identity"] == "eileen"
