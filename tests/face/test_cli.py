"""The ``kprpe align | embed | verify | search`` commands, run in-process through ``kprpe.cli.main``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kprpe.cli import main
from kprpe.face import FaceEmbedder, FacePipeline

from .conftest import TINY_WEIGHTS, run_cli

pytest.importorskip("dlib")
run = run_cli
W = str(TINY_WEIGHTS)


@pytest.mark.parametrize(
    "command", [["align"], ["embed"], ["verify"], ["search"], ["search", "enrol"], ["search", "query"]]
)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: kprpe" in capsys.readouterr().out


def test_top_level_help_lists_face_commands():
    out = subprocess.run(
        [sys.executable, "-m", "kprpe.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("align", "embed", "verify", "search"):
        assert name in out


def test_align_writes_crops_and_normalised_landmarks(
    capsys, photo_dir, tmp_path, astronaut, astronaut_detection
):
    from kprpe.face import align_face

    out = tmp_path / "aligned"
    code, payload, _ = run(capsys, "align", str(photo_dir), "-o", str(out), "--draw", "-q")
    assert code == 0 and payload["faces"] == 2 and payload["failures"] == []
    rows = list(csv.DictReader(open(out / "landmarks.csv")))
    assert list(rows[0]) == ["file", "x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4"]
    assert [r["file"] for r in rows] == ["astronaut.png", "tilted.png"]
    crop = np.asarray(Image.open(out / "astronaut.png"))
    assert crop.shape == (112, 112, 3)
    expected = align_face(astronaut, astronaut_detection.keypoints)
    np.testing.assert_array_equal(crop, expected.image)
    values = np.array([float(rows[0][c]) for c in list(rows[0])[1:]]).reshape(5, 2)
    np.testing.assert_allclose(values, expected.keypoints, atol=1e-6)
    assert (out / "draw" / "astronaut.png").is_file()
    # the other photo is the same face rotated 15 degrees: after alignment its keypoints agree
    other = np.array([float(rows[1][c]) for c in list(rows[1])[1:]]).reshape(5, 2)
    assert np.abs(other - values).max() * 112 < 3


def test_align_modes_and_prealigned_round_trip(capsys, photo_dir, tmp_path):
    out = tmp_path / "un"
    code, _, _ = run(
        capsys, "align", str(photo_dir / "astronaut.png"), "-o", str(out), "--mode", "unaligned", "-q"
    )
    assert code == 0
    unaligned = next(csv.DictReader(open(out / "landmarks.csv")))
    out2 = tmp_path / "al"
    assert run(capsys, "align", str(photo_dir / "astronaut.png"), "-o", str(out2), "-q")[0] == 0
    aligned = next(csv.DictReader(open(out2 / "landmarks.csv")))
    assert unaligned != aligned
    # prealigned: landmarks predicted on the 112x112 crop land close to where alignment put them
    out3 = tmp_path / "pre"
    code, payload, _ = run(
        capsys, "align", str(out2 / "astronaut.png"), "-o", str(out3), "--mode", "prealigned", "-q"
    )
    assert code == 0
    pre = next(csv.DictReader(open(out3 / "landmarks.csv")))
    diff = max(abs(float(pre[c]) - float(aligned[c])) for c in list(aligned)[1:])
    assert diff * 112 < 3
    # and the crops + landmarks.csv feed back as supplied landmarks
    out4 = tmp_path / "fed"
    code, _, _ = run(
        capsys,
        "align",
        str(out2 / "astronaut.png"),
        "-o",
        str(out4),
        "--mode",
        "prealigned",
        "--landmarks",
        str(out2 / "landmarks.csv"),
        "--landmarks-normalized",
        "-q",
    )
    assert code == 0
    fed = next(csv.DictReader(open(out4 / "landmarks.csv")))
    assert all(abs(float(fed[c]) - float(aligned[c])) < 1e-5 for c in list(aligned)[1:])


def test_embed_matches_python_api(capsys, photo_dir, tmp_path, dlib_detector):
    code, payload, _ = run(
        capsys, "embed", str(photo_dir), "--weights", W, "-o", str(tmp_path / "e.npz"), "-q"
    )
    assert code == 0 and payload["embedded"] == 2 and payload["dim"] == 32
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        names, embeddings, norms = data["names"], data["embeddings"], data["norms"]
        assert data["failures"].shape == (0, 2)
        json.loads(str(data["metadata"]))
    batch = FacePipeline(dlib_detector).process([photo_dir], progress=False)
    unit, api_norms = FaceEmbedder.from_weights(TINY_WEIGHTS).embed_faces([r.face for r in batch.records])
    assert names.tolist() == [r.name for r in batch.records]
    np.testing.assert_allclose(embeddings, unit, atol=1e-6)
    np.testing.assert_allclose(norms, api_norms, rtol=1e-6)


def test_embed_reports_bad_inputs_and_continues(capsys, photo_dir, tmp_path):
    (tmp_path / "x.txt").write_text("text")
    (tmp_path / "cut.jpg").write_bytes((photo_dir / "tilted.jpg").read_bytes()[:3000])
    Image.new("RGB", (80, 80), (0, 0, 255)).save(tmp_path / "blue.png")
    code, payload, err = run(
        capsys,
        "embed",
        str(photo_dir / "astronaut.png"),
        str(tmp_path / "x.txt"),
        str(tmp_path / "cut.jpg"),
        str(tmp_path / "blue.png"),
        "--weights",
        W,
        "-o",
        str(tmp_path / "e.npz"),
        "-q",
    )
    assert code == 1
    assert payload["embedded"] == 1 and len(payload["failures"]) == 3
    assert "x.txt" in err and "cut.jpg" in err and "blue.png" in err
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        assert data["embeddings"].shape == (1, 32)
        assert sorted(f.split("/")[-1] for f in data["failures"][:, 0]) == ["blue.png", "cut.jpg", "x.txt"]


def test_embed_all_faces_names(capsys, astronaut, tmp_path):
    import cv2

    face = astronaut[40:240, 130:320]
    big = cv2.resize(face, None, fx=1.3, fy=1.3)
    canvas = np.full((300, 480, 3), 200, np.uint8)
    canvas[10 : 10 + big.shape[0], 5 : 5 + big.shape[1]] = big
    canvas[60 : 60 + face.shape[0], 265 : 265 + face.shape[1]] = face
    Image.fromarray(canvas).save(tmp_path / "two.png")
    code, payload, _ = run(
        capsys,
        "embed",
        str(tmp_path / "two.png"),
        "--all-faces",
        "--weights",
        W,
        "-o",
        str(tmp_path / "e.npz"),
        "-q",
    )
    assert code == 0 and payload["embedded"] == 2
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        assert [n.split("/")[-1] for n in data["names"]] == ["two.png#0", "two.png#1"]
        assert data["face_index"].tolist() == [0, 1]


def test_verify_same_photo_and_visualization(capsys, photo_dir, tmp_path):
    picture = tmp_path / "vis.png"
    code, payload, _ = run(
        capsys,
        "verify",
        str(photo_dir / "astronaut.png"),
        str(photo_dir / "astronaut.png"),
        "--weights",
        W,
        "--visualize",
        str(picture),
    )
    assert code == 0
    assert payload["similarity"] == pytest.approx(1.0, abs=1e-6) and payload["same"] is True
    image = np.asarray(Image.open(picture))
    assert image.shape[1] > 2 * 112 and image.shape[0] > 112
    code, payload, _ = run(
        capsys,
        "verify",
        str(photo_dir / "astronaut.png"),
        str(photo_dir / "tilted.jpg"),
        "--weights",
        W,
        "--threshold",
        "1.5",
    )
    assert code == 0 and payload["same"] is False and payload["threshold"] == 1.5


def test_verify_show_draws_what_the_page_shows(capsys, photo_dir, tmp_path):
    import cv2

    from kprpe.face.draw import BOX_COLOUR

    picture = tmp_path / "show.png"
    a, b = photo_dir / "astronaut.png", photo_dir / "tilted.jpg"
    argv = ["verify", str(a), str(b), "--weights", W, "--show", str(picture)]
    code, payload, _ = run(capsys, *argv)
    assert code == 0 and payload["show"] == str(picture)
    image = np.asarray(Image.open(picture))
    # the photos' row (320 high) with the detector box in the page's colour where dlib put it
    face = FacePipeline().faces_in_file(a)[0]
    scale = 320 / np.asarray(Image.open(a)).shape[0]
    x0, y0, x1, y1 = (round(v * scale) for v in face.box)
    top_edge = image[y0, x0 + 3 : x1 - 3]
    assert (top_edge == BOX_COLOUR).all(axis=-1).mean() > 0.5
    # the crops' row (224 high, 2x) under it holds the crop the model saw
    crop_rows = image[330 : 330 + 224, :224]
    expected = cv2.resize(face.image, (224, 224), interpolation=cv2.INTER_NEAREST)
    assert np.abs(crop_rows.astype(int) - expected).mean() < 8  # only the drawn keypoints differ
    assert image.shape[0] > 330 + 224  # and the score under them
    code, _, err = run(capsys, *argv)  # never replaced without --overwrite
    assert code == 2 and "already exists" in err


def test_align_show_draws_the_photo_and_its_crop(capsys, photo_dir, tmp_path):
    import cv2

    from kprpe.face import FacePipeline
    from kprpe.face.draw import BOX_COLOUR

    photo, picture = photo_dir / "astronaut.png", tmp_path / "show.png"
    code, payload, _ = run(capsys, "align", photo, "-o", tmp_path / "out", "--show", picture, "-q")
    assert code == 0 and payload["show"] == str(picture) and payload["faces"] == 1
    image = np.asarray(Image.open(picture))
    face = FacePipeline().faces_in_file(photo)[0]
    scale = 320 / np.asarray(Image.open(photo)).shape[0]
    x0, y0, x1, y1 = (round(v * scale) for v in face.box)
    assert (image[y0, x0 + 3 : x1 - 3] == BOX_COLOUR).all(axis=-1).mean() > 0.5
    left = round(np.asarray(Image.open(photo)).shape[1] * scale) + 12  # the crop, 2x, right of the photo
    expected = cv2.resize(face.image, (224, 224), interpolation=cv2.INTER_NEAREST)
    assert np.abs(image[:224, left : left + 224].astype(int) - expected).mean() < 8
    for argv, message in [
        (["align", photo, photo_dir / "tilted.jpg", "-o", tmp_path / "o2", "--show", tmp_path / "s.png"],
         "exactly one image"),
        (["align", photo, "-o", tmp_path / "o3", "--show", tmp_path / "o3" / "s.png"], "inside the output"),
        (["align", photo, "-o", tmp_path / "o4", "--show", picture], "already exists"),
        (["align", photo, "-o", tmp_path / "o5", "--show", photo], "input"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, err


@pytest.mark.parametrize(
    "make_b, extra, message",
    [
        (lambda p: p.write_text("nope"), [], "not an image file"),
        (lambda p: Image.new("RGB", (60, 60)).save(p, format="PNG"), [], "no face found"),
        (None, ["--weights", "/nonexistent/w.safetensors"], "weights not found"),
    ],
)
def test_verify_failures_exit_2_with_message(capsys, photo_dir, tmp_path, make_b, extra, message):
    b = tmp_path / "b.png"
    if make_b is not None:
        make_b(b)
    else:
        b = photo_dir / "astronaut.png"
    argv = ["verify", str(photo_dir / "astronaut.png"), str(b), *(extra or ["--weights", W])]
    code, payload, err = run(capsys, *argv)
    assert code == 2 and payload is None
    assert message in err and "Traceback" not in err


def test_bad_weights_file(capsys, photo_dir, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    code, _, err = run(
        capsys,
        "embed",
        str(photo_dir),
        "--weights",
        str(tmp_path / "w.safetensors"),
        "-o",
        str(tmp_path / "e.npz"),
    )
    assert code == 2 and "cannot load weights" in err
    assert not (tmp_path / "e.npz").exists()


def test_search_enrol_and_query(capsys, astronaut, photo_dir, tmp_path):
    gallery = tmp_path / "gallery"
    (gallery / "eileen").mkdir(parents=True)
    (gallery / "other").mkdir()
    Image.fromarray(astronaut).save(gallery / "eileen" / "a.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, 2))).save(
        gallery / "other" / "upside.png"
    )  # no face
    code, payload, err = run(
        capsys, "search", "enrol", str(gallery), "--weights", W, "-o", str(tmp_path / "idx.npz"), "-q"
    )
    assert code == 1 and payload["identities"] == 1 and "upside.png" in err
    code, payload, _ = run(
        capsys,
        "search",
        "query",
        str(photo_dir / "astronaut.png"),
        "--index",
        str(tmp_path / "idx.npz"),
        "--weights",
        W,
        "-k",
        "3",
        "-q",
    )
    assert code == 0
    [result] = payload["results"]
    assert result["matches"][0]["identity"] == "eileen"
    assert result["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    code, _, err = run(
        capsys, "search", "query", str(photo_dir), "--index", str(tmp_path / "missing.npz"), "--weights", W
    )
    assert code == 2 and "does not exist" in err


def test_missing_dlib_is_a_clear_cli_error(capsys, photo_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    code, _, err = run(capsys, "align", str(photo_dir), "-o", str(tmp_path / "o"))
    assert code == 2 and "kprpe[face]" in err


def test_align_never_overwrites_its_inputs_or_foreign_files(capsys, photo_dir, tmp_path):
    """`kprpe align DIR -o DIR` once replaced the input photos with crops of the same name."""
    before = {p.name: p.read_bytes() for p in photo_dir.iterdir()}
    code, _, err = run(capsys, "align", str(photo_dir), "-o", str(photo_dir), "-q")
    assert code == 2 and "contains the input" in err
    assert {p.name: p.read_bytes() for p in photo_dir.iterdir()} == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "astronaut.png").write_bytes(b"precious")
    code, _, err = run(capsys, "align", str(photo_dir), "-o", str(foreign), "-q")
    assert code == 2 and "not written by this command" in err
    assert (foreign / "astronaut.png").read_bytes() == b"precious"


def test_align_rerun_replaces_the_whole_set(capsys, photo_dir, tmp_path):
    out = tmp_path / "aligned"
    assert run(capsys, "align", str(photo_dir), "-o", str(out), "-q")[0] == 0
    first = sorted(p.name for p in out.iterdir())
    assert "landmarks.csv" in first and len([n for n in first if n.endswith(".png")]) == len(
        list(photo_dir.iterdir())
    )
    (out / "failures.csv").write_text("file,reason\nold.png,stale\n")  # as if an earlier run had failures
    # a re-run into the same folder with one input: no crop, landmark row or failure list of the old run
    # survives
    one = sorted(photo_dir.iterdir())[0]
    assert run(capsys, "align", str(one), "-o", str(out), "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{one.stem}.png", "landmarks.csv"]
    )
    rows = list(csv.DictReader(open(out / "landmarks.csv")))
    assert [r["file"] for r in rows] == [f"{one.stem}.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aligned.")]  # no staging left behind


def test_align_killed_midway_leaves_the_previous_output_whole(capsys, photo_dir, tmp_path, monkeypatch):
    out = tmp_path / "aligned"
    assert run(capsys, "align", str(photo_dir), "-o", str(out), "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    import kprpe.cli.face as commands

    def die(*a, **k):
        raise KeyboardInterrupt  # stands in for a crash while the crops are being written

    monkeypatch.setattr(commands, "write_csv", die)
    assert main(["align", str(photo_dir), "-o", str(out), "-q"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aligned.")]


def test_nan_weights_are_refused_not_printed_as_invalid_json(capsys, photo_dir, tmp_path):
    """A diverged checkpoint once gave `"similarity": NaN` (invalid JSON) and NaN rows in embed, with exit
    0."""
    import torch

    import kprpe

    model = kprpe.load_official(TINY_WEIGHTS)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    broken = kprpe.save_model(model, tmp_path / "diverged.safetensors")
    photo = str(photo_dir / "astronaut.png")
    code, payload, err = run(capsys, "verify", photo, photo, "--weights", str(broken))
    assert code == 2 and payload is None and "non-finite similarity" in err
    out = tmp_path / "e.npz"
    code, payload, err = run(capsys, "embed", photo, "--weights", str(broken), "-o", str(out), "-q")
    assert code == 2 and "non-finite embeddings" in err and not out.exists()


def test_a_folder_with_only_sub_folders_is_an_error_not_zero_faces(capsys, photo_dir, tmp_path):
    nested = tmp_path / "people"
    (nested / "alice").mkdir(parents=True)
    (nested / "alice" / "a.png").write_bytes((photo_dir / "astronaut.png").read_bytes())
    code, payload, err = run(
        capsys, "embed", str(nested), "--weights", W, "-o", str(tmp_path / "e.npz"), "-q"
    )
    assert code == 2 and payload is None and "holds no images" in err and "sub-folders" in err
    assert not (tmp_path / "e.npz").exists()


def test_align_lets_each_chunk_of_crops_go(capsys, three_photos, tmp_path, old_crops_alive):
    code, payload, _ = run(capsys, "align", three_photos, "-o", tmp_path / "out", "-q")
    assert code == 0 and payload["faces"] == 3 and payload["images"] == 3
    assert len(old_crops_alive) == 3 and max(old_crops_alive) == 0  # bounded memory, whatever the input count
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png", "c.png"]


def test_search_query_lets_each_chunk_of_crops_go(capsys, three_photos, tmp_path, old_crops_alive):
    index = tmp_path / "idx.npz"
    assert run(capsys, "search", "enrol", three_photos, "-o", index, "--weights", W, "-q")[0] == 0
    old_crops_alive.clear()  # enrol streams through its own path; only the query is measured
    code, payload, _ = run(
        capsys, "search", "query", three_photos, "--index", index, "--weights", W, "--batch-size", "1", "-q"
    )
    best = [r["matches"][0]["score"] for r in payload["results"]]
    assert code == 0 and best == pytest.approx([1, 1, 1], abs=1e-5)
    assert len(old_crops_alive) == 3 and max(old_crops_alive) == 0


def test_align_searches_identity_folders_and_keeps_their_structure(capsys, photo_dir, tmp_path):
    # photos/<person>/<photo>: one run instead of a shell loop with a start-up per folder
    import shutil

    photos = tmp_path / "photos"
    (photos / "ann").mkdir(parents=True)
    (photos / "bob").mkdir()
    shutil.copy(photo_dir / "astronaut.png", photos / "ann" / "astronaut.png")
    shutil.copy(photo_dir / "tilted.jpg", photos / "bob" / "tilted.jpg")
    shutil.copy(photo_dir / "astronaut.png", photos / "bob" / "astronaut.png")  # same name, other person
    out = photos / "crops"  # an output inside the input folder is not read back on a re-run
    for _ in range(2):
        code, payload, _ = run(capsys, "align", str(photos), "-o", str(out), "-q")
        assert code == 0 and payload["faces"] == 3 and payload["images"] == 3
    rows = [r["file"] for r in csv.DictReader(open(out / "landmarks.csv"))]
    assert rows == ["ann/astronaut.png", "bob/astronaut.png", "bob/tilted.png"]
    for name in rows:
        assert np.asarray(Image.open(out / name)).shape == (112, 112, 3)
    # the crops feed `kprpe pack` as they are: one identity per sub-folder
    code = main(["pack", str(out), "-o", str(tmp_path / "train.rec"), "-q"])
    assert code == 0 and json.loads(capsys.readouterr().out)["identities"] == 2
