"""``kprpe serve`` takes the face commands' options (docs/cli.md): an ONNX model with ``--engine onnx``,
``--landmarks request`` for keypoints sent with each request, ``--mode``, ``--batch-size``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kprpe.cli import build_parser, main

TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_kprpe.safetensors"
# the astronaut's 5 keypoints in photo pixels (hand-checked, as in tests/face/conftest.py)
KEYPOINTS = np.array([[203.0, 102.0], [246.0, 104.0], [224.0, 126.0], [203.0, 140.0], [244.0, 141.0]])


def _service(capsys, *argv):
    from kprpe.cli.serve import build_service

    service = build_service(build_parser().parse_args(["serve", *map(str, argv)]))
    return service, capsys.readouterr().err


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", str(TINY_WEIGHTS), "-o", str(out)]) == 0
    return out


def test_serve_runs_an_onnx_model_like_the_checkpoint(onnx_model, astronaut, capsys):
    capsys.readouterr()
    onnx, err = _service(capsys, "--weights", onnx_model, "--engine", "onnx", "--landmarks", "request")
    assert err == "" and type(onnx.embedder.model).__name__ == "OnnxEngine"
    torch_service, _ = _service(capsys, "--weights", TINY_WEIGHTS, "--landmarks", "request")
    _, unit_onnx, _ = onnx.analyse([("image", astronaut, KEYPOINTS)])
    _, unit_torch, _ = torch_service.analyse([("image", astronaut, KEYPOINTS)])
    # 1e-4: the bound `kprpe export` checks between ONNX Runtime and PyTorch (float32 graphs, fused ops
    # reordered); unit vectors, so it is an absolute bound per coordinate
    np.testing.assert_allclose(unit_onnx, unit_torch, atol=1e-4)
    # and the page's KP-RPE view says plainly that an ONNX model has none, rather than failing
    assert isinstance(onnx.kprpe_view(), str)


def test_serve_without_engine_onnx_names_the_option(onnx_model, capsys):
    from kprpe.cli.serve import build_service
    from kprpe.errors import KprpeError

    with pytest.raises(KprpeError):  # a one-line error (main prints it), not a traceback
        build_service(build_parser().parse_args(["serve", "--weights", str(onnx_model)]))


def test_serve_mode_and_supplied_keypoints(astronaut, capsys):
    aligned, _ = _service(capsys, "--weights", TINY_WEIGHTS, "--landmarks", "request")
    options = ("--weights", TINY_WEIGHTS, "--landmarks", "request")
    unaligned, _ = _service(capsys, *options, "--mode", "unaligned")
    (face_a,), _, _ = aligned.analyse([("image", astronaut, KEYPOINTS)])
    (face_u,), _, _ = unaligned.analyse([("image", astronaut, KEYPOINTS)])
    # each is the face pipeline's crop in that mode (the options reach the pipeline; they differ)
    from kprpe.face.landmark_files import SuppliedLandmarks
    from kprpe.face.pipeline import FacePipeline

    for face, mode in ((face_a, "aligned"), (face_u, "unaligned")):
        supplied = SuppliedLandmarks.from_arrays({"upload": KEYPOINTS})
        (expected,) = FacePipeline(supplied, mode=mode).faces_in_image(astronaut, source="upload")
        np.testing.assert_array_equal(face.image, expected.image)
    assert np.abs(face_a.keypoints - face_u.keypoints).max() > 0.01


def test_old_aligner_supplied_still_works_and_warns(capsys):
    service, err = _service(capsys, "--weights", TINY_WEIGHTS, "--aligner", "supplied")
    assert service.aligner == "supplied"
    assert err.strip() == (
        "kprpe serve: warning: --aligner supplied is deprecated, use --landmarks request "
        "(the old spelling goes in kprpe 0.5)"
    )


def test_serve_refuses_a_landmark_file_in_one_line(tmp_path, capsys):
    landmarks = tmp_path / "lm.csv"
    landmarks.write_text("file,x0\n")
    assert main(["serve", "--weights", str(TINY_WEIGHTS), "--landmarks", str(landmarks)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kprpe serve: error: --landmarks takes 'request' here") and err.count("\n") == 1


def test_serve_quiet_prints_nothing_before_the_server_starts(monkeypatch, capsys):
    pytest.importorskip("uvicorn")
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.setdefault("level", self.config.log_level))
    assert main(["serve", "--weights", str(TINY_WEIGHTS), "--landmarks", "request", "-q"]) == 0
    assert capsys.readouterr().err == "" and seen["level"] == "warning"
    assert main(["serve", "--weights", str(TINY_WEIGHTS), "--landmarks", "request"]) == 0
    assert "page and API at" in capsys.readouterr().err


def test_serve_landmarks_request_and_the_dfa_are_one_choice(capsys):
    assert main(["serve", "--weights", str(TINY_WEIGHTS), "--landmarks", "request", "--aligner", "dfa"]) == 2
    err = capsys.readouterr().err
    expected = "--landmarks request and --aligner dfa both give keypoints; choose one"
    assert err == f"kprpe serve: error: {expected}\n"
