"""Swin / Swin-KP-RPE to ONNX: parity with PyTorch and the official vectors at another batch size."""

from __future__ import annotations

import json

import pytest
import torch

import kprpe
from kprpe.cli import main
from kprpe.export import OnnxEngine, export_onnx
from kprpe.export.onnx import EXPORT_BATCH
from reference_vectors import DATA

pytest.importorskip("onnxruntime")

SWIN = DATA / "swin_kprpe"
# float32 graphs vs PyTorch: the bound; measured ~1e-5 (different kernels, same arithmetic)
TOL = dict(rtol=1e-4, atol=1e-4)


def test_official_swin_kprpe_vectors_through_onnxruntime(tmp_path, capsys):
    from safetensors.torch import load_file

    ref = load_file(str(SWIN / "tiny_swin_kprpe_io.safetensors"))
    out = tmp_path / "swin.onnx"
    code = main(["export", str(SWIN / "tiny_swin_kprpe.safetensors"), "-o", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["inputs"] == ["images", "keypoints"]
    assert summary["parity"]["batch"] != EXPORT_BATCH and summary["parity"]["max_abs_diff"] < 1e-4
    assert ref["images"].shape[0] != EXPORT_BATCH  # the graph runs at batch sizes it was not traced at
    engine = OnnxEngine(out)
    torch.testing.assert_close(engine(ref["images"], ref["keypoints"]), ref["output"], **TOL)
    torch.testing.assert_close(engine(ref["images"][2:], ref["keypoints"][2:]), ref["output"][2:], **TOL)


@pytest.mark.parametrize("rel_pos", ["cpb", "kprpe"])
def test_swin_exports_with_parity_padded_shifted_rectangular(tmp_path, rel_pos):
    torch.manual_seed(0)
    model = kprpe.create_model(
        f"swin_small{'_kprpe' if rel_pos == 'kprpe' else ''}",
        img_size=30,
        patch_size=2,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=(3, 5),
        output_dim=8,
    ).eval()
    with torch.no_grad():  # f starts at zero; give the bias something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, check=False)
    engine = OnnxEngine(path)
    assert engine.uses_keypoints == model.uses_keypoints
    images, keypoints = torch.rand(5, 3, 30, 30) * 2 - 1, torch.rand(5, 5, 2) * 1.2 - 0.1
    kp = keypoints if model.uses_keypoints else None
    with torch.no_grad():
        torch.testing.assert_close(engine(images, kp), model(images, kp), **TOL)


def test_embed_command_same_with_torch_and_onnx_engines(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    weights = SWIN / "tiny_swin_kprpe.safetensors"
    export_onnx(weights, tmp_path / "swin.onnx", check=False)
    rng = np.random.default_rng(2)
    rows = ["file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4"]
    points = [38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]
    for i in range(2):  # already aligned 112x112 crops with supplied landmarks: no detector involved
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / f"face{i}.png")
        rows.append(",".join([f"face{i}.png", *(f"{v:.1f}" for v in points)]))
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    outputs = {}
    for engine, model in (("torch", weights), ("onnx", tmp_path / "swin.onnx")):
        argv = [
            "embed",
            tmp_path / "face0.png",
            tmp_path / "face1.png",
            "--landmarks",
            tmp_path / "landmarks.csv",
            "--weights",
            model,
            "--engine",
            engine,
            "-o",
            tmp_path / f"{engine}.npz",
            "-q",
        ]
        assert main([str(a) for a in argv]) == 0
        assert json.loads(capsys.readouterr().out)["embedded"] == 2
        with np.load(tmp_path / f"{engine}.npz", allow_pickle=False) as data:
            outputs[engine] = data["embeddings"]
    np.testing.assert_allclose(outputs["onnx"], outputs["torch"], atol=1e-4, rtol=0)
