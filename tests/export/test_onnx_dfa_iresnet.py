"""ONNX export of IResNet and of the DFA aligner: ONNX Runtime against PyTorch, and the DFA graph against the
official reference vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from float_tolerance import assert_float32_close  # noqa: E402
from kprpe.export import export_onnx, load_engine, sidecar_path  # noqa: E402
from kprpe.export.onnx import DFA_OUTPUTS, DfaGraph  # noqa: E402

DFA = Path(__file__).resolve().parents[1] / "fixtures" / "dfa"


def _dfa():
    from kprpe.face.dfa import DifferentiableFaceAligner

    aligner = DifferentiableFaceAligner()
    aligner.load_state_dict(load_file(DFA / "dfa_weights.safetensors"))
    return aligner.eval()


def test_iresnet_exports_and_runs_in_onnxruntime(tmp_path):
    from kprpe.nn.iresnet import IResNet

    torch.manual_seed(0)
    model = IResNet(num_layers=18, color_space="BGR").eval()
    sidecar = export_onnx(model, tmp_path / "ir18.onnx")
    parity = sidecar["parity"]  # relative to the output scale (a random IR-18 gives outputs in the tens)
    assert sidecar["kind"] == "iresnet" and parity["max_abs_diff"] <= 1e-4 * max(
        1.0, parity["max_abs_output"]
    )
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = model(images)
        exact = model.double()(images.double())  # the same network in float64: the ground truth
    # ONNX Runtime's float32 within a few times PyTorch's own float32 error on this CPU (~4e-4 at an output
    # scale of ~150 on AVX2: 18 layers of float32 convolutions), not a fixed atol read off one machine
    assert_float32_close(load_engine(tmp_path / "ir18.onnx")(images), expected, exact, msg="ONNX Runtime")


def test_dfa_graph_matches_the_official_vectors():
    """The traceable forward (closed-form similarity in float32) against the official outputs."""
    io = load_file(DFA / "dfa_io.safetensors")
    with torch.no_grad():
        got = DfaGraph(_dfa())(io["sq160.input"])
    reference = {name: io[f"sq160.{name}"] for name in DFA_OUTPUTS}
    for name in ("orig_pred_ldmks", "aligned_ldmks", "score", "thetas"):
        torch.testing.assert_close(got[DFA_OUTPUTS.index(name)], reference[name], rtol=0, atol=2e-4)
    torch.testing.assert_close(got[5], reference["normalized_bbox"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0], reference["aligned_x"], rtol=0, atol=1e-2)


def test_dfa_exports_and_onnxruntime_matches_torch(tmp_path):
    """Landmarks, score, box and theta within 1e-4 of PyTorch. The crop is checked as the reference README
    advises: ONNX Runtime's crop against PyTorch's warp at ONNX Runtime's own theta (1e-4); end to end it
    moves with the image gradient times the ~1e-5 theta difference that runtimes' convolutions cause."""
    from kprpe.face.dfa.aligner import warp

    aligner = _dfa()
    sidecar = export_onnx(aligner, tmp_path / "dfa.onnx")
    assert sidecar["kind"] == "dfa" and list(sidecar["outputs"]) == list(DFA_OUTPUTS)
    assert set(sidecar["parity"]["per_output"]) == set(DFA_OUTPUTS)
    assert json.loads(sidecar_path(tmp_path / "dfa.onnx").read_text())["inputs"]["images"]["shape"][2] == 160
    io = load_file(DFA / "dfa_io.safetensors")
    images = io["sq160.input"]
    session = ort.InferenceSession(str(tmp_path / "dfa.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(DFA_OUTPUTS, session.run(list(DFA_OUTPUTS), {"images": images.numpy()}), strict=True))
    with torch.no_grad():
        expected = dict(zip(DFA_OUTPUTS, DfaGraph(aligner)(images), strict=True))
    for name in DFA_OUTPUTS[1:]:
        np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=0, atol=1e-4, err_msg=name)
    rewarped, _ = warp(images, torch.from_numpy(got["thetas"]))
    np.testing.assert_allclose(got["aligned_x"], rewarped.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["aligned_x"], expected["aligned_x"].numpy(), rtol=0, atol=1e-2)
    single = session.run(["aligned_ldmks"], {"images": images[:1].numpy()})[0]  # another batch size
    np.testing.assert_allclose(single, expected["aligned_ldmks"][:1].numpy(), rtol=0, atol=1e-4)
