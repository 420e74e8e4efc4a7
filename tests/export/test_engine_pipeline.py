"""``--engine onnx``: the face pipeline and evaluation embed the same with ONNX Runtime as with PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kprpe
from kprpe.cli import main
from reference_vectors import DATA

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from kprpe.export import OnnxEngine, export_onnx  # noqa: E402

WEIGHTS = DATA / "tiny_kprpe.safetensors"


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "tiny_kprpe.onnx"
    export_onnx(WEIGHTS, path, check=False)
    return path


def _crops(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    keypoints = (rng.uniform(0.25, 0.75, (n, 5, 2))).astype(np.float32)
    return crops, keypoints


def test_face_embedder_same_embeddings_with_both_engines(onnx_file):
    from kprpe.face import FaceEmbedder

    crops, keypoints = _crops(5)
    torch_unit, torch_norms = FaceEmbedder(kprpe.load_official(WEIGHTS), batch_size=2).embed_crops(
        crops, keypoints
    )
    embedder = FaceEmbedder(OnnxEngine(onnx_file), batch_size=2)  # flip TTA on, batches of 2, 2 and 1
    unit, norms = embedder.embed_crops(crops, keypoints)
    np.testing.assert_allclose(unit, torch_unit, atol=1e-4, rtol=0)
    np.testing.assert_allclose(norms, torch_norms, atol=1e-4, rtol=1e-4)
    assert embedder.output_dim == 32 and len(embedder.fingerprint) == 64


def test_eval_embedding_same_with_both_engines(onnx_file):
    from kprpe.eval.embedding import FaceSource, embed_faces
    from kprpe.eval.runs import ModelHandle

    crops, keypoints = _crops(4, seed=1)
    source = FaceSource(4, lambda a, b: (crops[a:b], keypoints[a:b]), "test")
    expected, _ = embed_faces(ModelHandle(WEIGHTS)(), source, batch_size=3, progress=False)
    got, _ = embed_faces(ModelHandle(onnx_file, engine="onnx")(), source, batch_size=3, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_embed_cli_with_onnx_engine(onnx_file, tmp_path, capsys):
    from PIL import Image

    crops, _ = _crops(2, seed=2)
    rows = ["file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4"]
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / f"face{i}.png")
        points = [38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]
        rows.append(",".join([f"face{i}.png", *(f"{v:.1f}" for v in points)]))
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    outputs = {}
    for engine, weights in (("torch", WEIGHTS), ("onnx", onnx_file)):
        out = tmp_path / f"{engine}.npz"
        code = main(
            [
                "embed",
                str(tmp_path / "face0.png"),
                str(tmp_path / "face1.png"),
                "--landmarks",
                str(tmp_path / "landmarks.csv"),
                "--weights",
                str(weights),
                "--engine",
                engine,
                "-o",
                str(out),
                "-q",
            ]
        )
        payload = json.loads(capsys.readouterr().out)
        assert code == 0 and payload["embedded"] == 2, payload
        with np.load(out, allow_pickle=False) as data:
            outputs[engine] = data["embeddings"]
    np.testing.assert_allclose(outputs["onnx"], outputs["torch"], atol=1e-4, rtol=0)


def test_engine_option_rejects_a_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "landmarks.csv").write_text("file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\na.png,1,1,2,1,1,2,1,3,2,3\n")
    code = main(
        [
            "embed",
            str(tmp_path / "a.png"),
            "--weights",
            str(WEIGHTS),
            "--engine",
            "onnx",
            "-o",
            str(tmp_path / "e.npz"),
            "--landmarks",
            str(tmp_path / "landmarks.csv"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "tiny_kprpe.safetensors is not a loadable ONNX model" in err
