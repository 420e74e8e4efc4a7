from __future__ import annotations

import sys

import numpy as np
import pytest

from kprpe.cli import main
from kprpe.data import RecordSource, read_landmarks


def test_make_example_data_and_pack(tmp_path, capsys, terminal):
    assert (
        main(
            [
                "make-example-data",
                "-o",
                str(tmp_path / "ex"),
                "--identities",
                "3",
                "--images-per-identity",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert len(RecordSource(tmp_path / "ex" / "train.rec")) == 12
    assert read_landmarks(tmp_path / "ex" / "landmarks.csv", num_samples=12).shape == (12, 5, 2)
    (tmp_path / "ex" / "images" / "id_0001" / "img_000.png").write_bytes(b"junk")
    # skipped images are loud: exit status 1 and a failure list, unless the user accepts them
    assert main(["pack", str(tmp_path / "ex" / "images"), "-o", str(tmp_path / "p.rec"), "--quiet"]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "wrote 11 images of 3 identities" in out and "SKIPPED 1 unreadable images" in out
    assert "id_0001/img_000.png" in out and "--allow-skipped" in captured.err
    assert "id_0001/img_000.png" in (tmp_path / "p.failures.json").read_text()
    assert (
        len(RecordSource(tmp_path / "p.rec")) == 11
        and RecordSource(tmp_path / "p.rec").declared_num_classes == 3
    )
    images = str(tmp_path / "ex" / "images")
    assert main(["pack", images, "-o", str(tmp_path / "p2.rec"), "--quiet", "--allow-skipped"]) == 0
    (tmp_path / "ex" / "images" / "id_0001" / "img_000.png").unlink()
    # replacing its own earlier output is asked for, like any other existing file
    assert main(["pack", images, "-o", str(tmp_path / "p.rec"), "--quiet", "--overwrite"]) == 0
    assert not (tmp_path / "p.failures.json").exists()  # a stale list from the earlier run is dropped
    assert main(["pack", str(tmp_path / "nowhere"), "-o", str(tmp_path / "p3.rec")]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_landmarks_command_without_face_pipeline(tmp_path, monkeypatch, capsys, synthetic_data):
    monkeypatch.setitem(sys.modules, "kprpe.face", None)  # as if the face pipeline were not installed
    assert main(["landmarks", str(synthetic_data["rec"]), "-o", str(tmp_path / "l.csv")]) == 2
    assert "face pipeline (kprpe.face) is not available" in capsys.readouterr().err


def test_landmarks_command_with_the_dlib_backend(tmp_path, synthetic_data):
    pytest.importorskip("dlib")
    out = tmp_path / "l.csv"
    assert (
        main(
            [
                "landmarks",
                str(synthetic_data["rec"]),
                "-o",
                str(out),
                "--mode",
                "crop",
                "--limit",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    kp = read_landmarks(out, num_samples=2)
    assert np.isfinite(kp).all()  # crop mode always yields points (synthetic images are not real faces)


def test_make_example_data_never_replaces_data_without_overwrite(tmp_path, capsys):
    """The one output rule: a second run into one folder is refused before any work; --overwrite replaces."""
    args = ["make-example-data", "-o", str(tmp_path / "ex"), "--identities", "2", "--images-per-identity"]
    args += ["2", "-q"]
    assert main(args) == 0
    landmarks = tmp_path / "ex" / "landmarks.csv"
    landmarks.write_text("my own edits")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and landmarks.read_text() == "my own edits"
    assert main([*args, "--overwrite"]) == 0
    assert landmarks.read_text() != "my own edits"


def test_train_on_fewer_samples_than_one_batch_is_one_line_exit_2(tmp_path, capsys, tiny_config):
    """issue 31: a fine-tune on a small folder ended in a traceback (exit 1); it must be one line, exit 2."""
    import yaml

    tiny_config["data"]["batch_size"] = 500  # the synthetic set has 24 x 8 = 192 samples
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("kprpe train: error: 192 samples are fewer than one global batch (500 x 1 process")
    assert "data.batch_size" in err
