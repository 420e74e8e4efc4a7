"""``--aligner dfa``: the official verification pipeline through the CLI, the backend, and bad input.

The DFA weights are the reference (random, untrained) ones of tests/fixtures/dfa, saved the way the official
checkpoint is (``pretrained_model/model.pt`` with ``net.`` keys); the recognition model is the tiny reference
KP-RPE. Random weights show the pipeline is composed exactly, not how good a trained aligner is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from kprpe.cli import main

from .conftest import DATA, TINY_WEIGHTS, run_cli

run = run_cli

DFA_WEIGHTS = DATA / "dfa" / "dfa_weights.safetensors"


@pytest.fixture(scope="module")
def dfa_folder(tmp_path_factory) -> Path:
    """The reference DFA weights as an official research checkpoint: <folder>/pretrained_model/model.pt."""
    folder = tmp_path_factory.mktemp("cvlface_DFA_mobilenet")
    (folder / "pretrained_model").mkdir()
    torch.save(load_file(DFA_WEIGHTS), folder / "pretrained_model" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut) -> tuple[Path, Path]:
    """The astronaut (square) and a non-square, shifted crop of it (the rectangular DFA path)."""
    folder = tmp_path_factory.mktemp("dfa_photos")
    Image.fromarray(astronaut).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[20:320, 90:330])).save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


def _official_composition(path: Path, aligner, model) -> tuple[torch.Tensor, object]:
    """image -> RGB tensor in [-1, 1] -> DFA -> (aligned_x, aligned_ldmks) -> model, written out by hand."""
    rgb = np.array(Image.open(path).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        out = aligner(x)
        feature = model(out.aligned_x, out.aligned_ldmks)
    return feature, out


def test_verify_with_dfa_is_the_official_composition(capsys, dfa_folder, photos):
    from kprpe.face.dfa import DifferentiableFaceAligner
    from kprpe.nn import load_official

    aligner = DifferentiableFaceAligner()
    aligner.load_state_dict(load_file(DFA_WEIGHTS), strict=True)
    aligner.eval()
    model = load_official(TINY_WEIGHTS).eval()
    feature_a, out_a = _official_composition(photos[0], aligner, model)
    feature_b, out_b = _official_composition(photos[1], aligner, model)
    expected = float(F.cosine_similarity(feature_a, feature_b)[0])

    code, payload, err = run(
        capsys,
        "verify",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "--weights",
        TINY_WEIGHTS,
        "-q",
    )
    assert code == 0, err
    assert abs(payload["similarity"] - expected) <= 1e-5
    assert payload["aligner"] == "dfa" and payload["flip"] is False  # the official pipeline has no flip
    np.testing.assert_allclose(payload["keypoints"][0], out_a.aligned_ldmks[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(payload["keypoints"][1], out_b.aligned_ldmks[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(payload["scores"], [float(out_a.score), float(out_b.score)], atol=1e-6)


def test_backend_gives_the_dfa_crop_keypoints_and_box_in_photo_pixels(dfa_folder, astronaut):
    from kprpe.face import DfaAligner, FacePipeline
    from kprpe.face.dfa_backend import photo_to_input

    backend = DfaAligner(dfa_folder)
    photo = np.ascontiguousarray(astronaut[:300, :260])
    with torch.no_grad():
        out = backend.aligner(photo_to_input([photo]))
    (face,) = FacePipeline(backend).faces_in_image(photo)
    np.testing.assert_array_equal(face.pixels, out.aligned_x[0].numpy())  # the DFA's own crop, not re-warped
    np.testing.assert_allclose(face.keypoints, out.aligned_ldmks[0].numpy(), atol=1e-7)
    # the photo-pixel keypoints are those the fitted transform carries onto the crop keypoints
    from kprpe.face.align import apply_transform

    np.testing.assert_allclose(
        apply_transform(face.transform, face.source_keypoints) / 112, face.keypoints, atol=1e-3
    )
    x0, y0, x1, y1 = face.box
    assert x1 > x0 and y1 > y0 and face.score == pytest.approx(float(out.score[0, 0]), abs=1e-7)
    # unaligned mode: the shared box crop of the DFA's box
    (loose,) = FacePipeline(backend, mode="unaligned").faces_in_image(photo)
    from kprpe.face.align import unaligned_crop

    np.testing.assert_array_equal(loose.image, unaligned_crop(photo, face.box)[0])


def test_batched_alignment_equals_one_photo_at_a_time(dfa_folder, astronaut):
    from kprpe.face import DfaAligner

    backend = DfaAligner(dfa_folder, batch_size=2)
    photos = [
        astronaut[:200, :200],
        astronaut[100:300, 150:350],
        astronaut[:150, :220],
        astronaut[:200, :200],
    ]
    photos = [np.ascontiguousarray(p) for p in photos]
    together = backend.align(photos)
    for photo, batched in zip(photos, together, strict=True):
        (alone,) = backend.align([photo])
        # batch size changes float32 summation order only (the reference README measures 1.2e-4 on crops; the
        # warp amplifies a theta rounding by the image gradient, so thread counts move it a little more)
        np.testing.assert_allclose(batched.crop, alone.crop, atol=1e-3)
        # Keypoints are the DFA's landmarks (fractions of its padded input frame) times the photo's side: the
        # reference README measures the official float32 forward 1.0e-5 of the frame away from float64, so
        # batch-dependent float32 rounding is bounded by that error in pixels (x2 for the frame's padding).
        # A fixed 1e-4 px was below one float32 rounding of a 200 px photo on AVX2 CPUs (1.2e-4 measured).
        side = max(photo.shape[:2])
        np.testing.assert_allclose(batched.keypoints, alone.keypoints, rtol=0, atol=2 * 1.0e-5 * side)


def test_min_aligner_score_rejects_low_scores(capsys, dfa_folder, photos, tmp_path):
    code, payload, err = run(
        capsys,
        "embed",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "--weights",
        TINY_WEIGHTS,
        "-o",
        tmp_path / "e.npz",
        "-q",
    )
    assert code == 0, err
    scores = np.load(tmp_path / "e.npz")["scores"]
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
    assert payload["lowest_score"] == pytest.approx(scores.min())
    threshold = float(scores.max()) + 1e-3 if scores.max() < 0.999 else 1.0
    code, payload, err = run(
        capsys,
        "embed",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "--weights",
        TINY_WEIGHTS,
        "-o",
        tmp_path / "f.npz",
        "-q",
        "--min-score",
        threshold,
    )
    assert code == 1 and payload["embedded"] == 0 and len(payload["failures"]) == 2
    assert "below --min-score" in payload["failures"][0]["reason"]


def test_align_with_dfa_writes_crops_and_scores(capsys, dfa_folder, photos, tmp_path):
    out = tmp_path / "aligned"
    code, payload, err = run(
        capsys, "align", *photos, "--aligner", "dfa", "--aligner-weights", dfa_folder, "-o", out, "-q"
    )
    assert code == 0, err
    assert payload["aligner"] == "dfa" and [s["file"] for s in payload["scores"]] == ["a.png", "b.png"]
    assert np.asarray(Image.open(out / "a.png")).shape == (112, 112, 3)


# ----------------------------------------------------------------------------------------- bad input
def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and err.count("\n") <= 2, err


def test_dfa_checkpoint_given_as_recognition_weights(capsys, dfa_folder, photos):
    weights = dfa_folder / "pretrained_model" / "model.pt"
    code, payload, err = run(
        capsys,
        "verify",
        *photos,
        "--weights",
        weights,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "-q",
    )
    assert code == 2 and payload is None
    assert str(weights) in err and "aligner" in err.lower()
    _no_traceback(err)


def test_recognition_weights_given_as_aligner(capsys, photos, tmp_path):
    out = tmp_path / "never"
    code, payload, err = run(
        capsys, "align", *photos, "--aligner", "dfa", "--aligner-weights", TINY_WEIGHTS, "-o", out, "-q"
    )
    assert code == 2 and payload is None and not out.exists()
    assert str(TINY_WEIGHTS) in err and "recognition" in err
    _no_traceback(err)


def test_unknown_aligner_repo_id_offline(capsys, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("KPRPE_CACHE", str(tmp_path / "kprpe"))
    code, payload, err = run(
        capsys,
        "verify",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        "nobody/no_such_aligner",
        "--weights",
        TINY_WEIGHTS,
        "-q",
    )
    assert code == 2 and payload is None and "nobody/no_such_aligner" in err
    _no_traceback(err)


def test_min_aligner_score_out_of_range_and_landmarks_conflict(capsys, dfa_folder, photos, tmp_path):
    code, _, err = run(
        capsys,
        "align",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "--min-score",
        "1.5",
        "-o",
        tmp_path / "x",
        "-q",
    )
    assert code == 2 and "[0, 1]" in err and not (tmp_path / "x").exists()
    landmarks = tmp_path / "l.csv"
    landmarks.write_text("file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\n")
    code, _, err = run(
        capsys,
        "align",
        *photos,
        "--aligner",
        "dfa",
        "--aligner-weights",
        dfa_folder,
        "--landmarks",
        landmarks,
        "-o",
        tmp_path / "y",
        "-q",
    )
    assert code == 2 and "choose one" in err


def test_load_aligner_top_level_accepts_paths(dfa_folder):
    import kprpe

    aligner = kprpe.load_aligner(dfa_folder)
    assert not aligner.training and aligner.input_size == 160


# ----------------------------------------------------------------------------------------- evaluation
def test_eval_backend_keypoints_are_the_official_dfa_landmarks(dfa_folder, astronaut):
    from kprpe.eval.landmarks import LandmarkBackend, backend_tag
    from kprpe.face.dfa_backend import photo_to_input

    faces = [np.ascontiguousarray(astronaut[y : y + 112, x : x + 112]) for y, x in ((40, 160), (60, 170))]
    backend = LandmarkBackend("dfa", weights=str(dfa_folder))
    keypoints = backend.landmarks(np.stack(faces))
    assert "dfa" in backend.tag and backend_tag() == ""  # the default stays dlib
    import kprpe

    with torch.no_grad():
        out = kprpe.load_aligner(dfa_folder)(photo_to_input(faces))
    np.testing.assert_allclose(keypoints, out.orig_pred_ldmks.numpy(), atol=2e-5)


def test_eval_pairs_with_the_dfa_backend(capsys, dfa_folder, astronaut, tmp_path):
    rows = []
    for i, (y, x) in enumerate(((40, 160), (60, 170), (30, 150), (50, 180))):
        Image.fromarray(np.ascontiguousarray(astronaut[y : y + 112, x : x + 112])).save(tmp_path / f"{i}.png")
    rows = ["0.png,1.png,1", "2.png,3.png,1", "0.png,3.png,0", "1.png,2.png,0"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    def pairs(aligner_weights, out):
        return main(
            ["eval", "pairs", "--weights", str(TINY_WEIGHTS), "--pairs", str(tmp_path / "pairs.csv")]
            + ["--keypoints", "backend", "--aligner", "dfa", "--aligner-weights", str(aligner_weights)]
            + ["-o", str(tmp_path / out), "--no-cache", "--quiet"]
        )

    code = pairs(dfa_folder, "run")
    err = capsys.readouterr().err
    assert code == 0, err
    code = pairs(TINY_WEIGHTS, "bad")  # recognition weights given as the aligner's
    err = capsys.readouterr().err
    assert code == 2 and "recognition" in err and not (tmp_path / "bad").exists()
    _no_traceback(err)


def test_landmarks_command_with_the_dfa(capsys, dfa_folder, astronaut, tmp_path):
    from kprpe.face.dfa_backend import photo_to_input
    from kprpe.landmarks import read_landmark_rows

    faces = [np.ascontiguousarray(astronaut[y : y + 112, x : x + 112]) for y, x in ((40, 160), (60, 170))]
    for i, face in enumerate(faces):
        (tmp_path / "data" / f"id{i}").mkdir(parents=True)
        Image.fromarray(face).save(tmp_path / "data" / f"id{i}" / "0.png")
    code = main(
        [
            "landmarks",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "lm.csv"),
            "--aligner",
            "dfa",
            "--aligner-weights",
            str(dfa_folder),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = read_landmark_rows(tmp_path / "lm.csv")
    import kprpe

    with torch.no_grad():
        expected = kprpe.load_aligner(dfa_folder)(photo_to_input(faces)).orig_pred_ldmks.numpy()
    np.testing.assert_allclose(np.stack([rows[0], rows[1]]), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------- serving
def test_serve_dfa_aligner_embeds_the_dfa_crop(dfa_folder, photos):
    pytest.importorskip("fastapi")
    from kprpe.face import FaceEmbedder
    from kprpe.face.dfa import DifferentiableFaceAligner
    from kprpe.nn import load_official
    from kprpe.serve import FaceService

    embedder = FaceEmbedder.from_weights(TINY_WEIGHTS, flip=False)
    service = FaceService(
        embedder,
        aligner="dfa",
        aligner_options={"weights": str(dfa_folder)},
        threshold=0.3,
        threshold_source="test",
    )
    photo = np.array(Image.open(photos[1]).convert("RGB"))
    faces, unit, _ = service.analyse([("image", photo, None)])
    aligner = DifferentiableFaceAligner()
    aligner.load_state_dict(load_file(DFA_WEIGHTS))
    feature, out = _official_composition(photos[1], aligner.eval(), load_official(TINY_WEIGHTS).eval())
    np.testing.assert_allclose(unit[0], F.normalize(feature, dim=-1)[0].numpy(), atol=1e-5)
    assert faces[0].score == pytest.approx(float(out.score[0, 0]), abs=1e-6)


def test_serve_refuses_a_recognition_model_as_aligner(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    code = main(
        [
            "serve",
            "--weights",
            str(TINY_WEIGHTS),
            "--aligner",
            "dfa",
            "--aligner-weights",
            str(TINY_WEIGHTS),
            "--port",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "recognition" in err
    _no_traceback(err)


def test_load_dfa_backend_gives_one_error_naming_the_weights(tmp_path):
    from kprpe.errors import KprpeError
    from kprpe.face.dfa_backend import AlignerLoadError, load_dfa_backend

    with pytest.raises(AlignerLoadError, match=f"cannot load the DFA aligner {tmp_path / 'missing'}"):
        load_dfa_backend(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KprpeError, match="cannot load the DFA aligner"):
        load_dfa_backend(tmp_path / "empty")
    with pytest.raises(AlignerLoadError, match=r"--min-score must be in \[0, 1\].*1.5"):
        load_dfa_backend(tmp_path / "missing", min_score=1.5)
