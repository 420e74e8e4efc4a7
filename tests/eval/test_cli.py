from __future__ import annotations

import json
import os
import pickle

import cv2
import numpy as np
import pytest

from kprpe.cli import main
from kprpe.eval.binfile import write_verification_bin

from .conftest import TINY_KPRPE, TINY_VIT, synthetic_photo, write_rgb


def _make_bin(path, n_pairs=20, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(2 * n_pairs):
        img = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (7, 7), 0)
        images.append(cv2.imencode(".jpg", img)[1].tobytes())
    write_verification_bin(path, images, [k % 2 == 0 for k in range(n_pairs)])
    return path


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_each_protocol(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for protocol in ("verify", "ijb", "pairs", "identify", "sweep", "10-fold", "TAR", "rank-1/5/20", "t=0"):
        assert protocol in text


def test_verify_writes_report_and_reuses_cache(tmp_path, capsys, monkeypatch):
    bin_path = _make_bin(tmp_path / "toy_lfw.bin")
    lm = tmp_path / "toy_lfw_landmarks.csv"
    rng = np.random.default_rng(0)
    rows = ["idx," + ",".join(f"ldmk_{i}" for i in range(10))]
    template = (
        np.array([38.2946, 51.6963, 73.5318, 51.5014, 56.0252, 71.7366, 41.5493, 92.3655, 70.7299, 92.2041])
        / 112
    )
    for i in range(40):
        rows.append(f"{i}," + ",".join(f"{v:.5f}" for v in template + rng.normal(0, 0.01, 10)))
    lm.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["verify", "--weights", TINY_KPRPE, "--bin", bin_path, "--landmarks", lm, "-o", out,
            "--cache-dir", tmp_path / "cache", "--quiet"]
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)  # as on a terminal
    code, stdout, _ = _run(capsys, *args)
    monkeypatch.undo()
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    r = results["sets"]["toy_lfw"]
    assert r["num_pairs"] == 20 and r["keypoint_source"] == "file" and not r["embeddings_from_cache"]
    assert 0.0 <= r["kfold"]["accuracy_mean"] <= 1.0 and len(r["kfold"]["fold_accuracies"]) == 10
    assert [row["far_target"] for row in r["tar_at_far"]] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    summary = (out / "summary.md").read_text()
    assert "toy_lfw" in summary and "±" in summary
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy (10-fold)" in stdout
    # a second run (here: another FAR list) reads the cached embeddings and gives the same accuracy
    code, stdout, _ = _run(capsys, *args, "--far", "1e-2,1e-1")
    again = json.loads((out / "results.json").read_text())["sets"]["toy_lfw"]
    # on a pipe (pytest's stdout): one line of JSON, the results without their curves, and the files
    printed = json.loads(stdout)
    assert stdout.count("\n") == 1 and printed["results"]["sets"]["toy_lfw"]["kfold"] == again["kfold"]
    assert "roc" not in printed["results"]["sets"]["toy_lfw"] and str(out / "roc.png") in printed["files"]
    assert code == 0 and again["embeddings_from_cache"]
    assert again["kfold"] == r["kfold"]
    # template keypoints are a different mode: a different cache entry
    code, _, _ = _run(capsys, "verify", "--weights", TINY_KPRPE, "--bin", bin_path, "--keypoints", "template",
                      "-o", out, "--cache-dir", tmp_path / "cache", "--quiet")
    assert (
        code == 0
        and not json.loads((out / "results.json").read_text())["sets"]["toy_lfw"]["embeddings_from_cache"]
    )


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_verify_refuses_a_malicious_bin(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "lfw.bin"
    evil.write_bytes(pickle.dumps(([_Evil(marker), b"x"], [True])))
    code, _, err = _run(capsys, "verify", "--weights", TINY_KPRPE, "--bin", evil, "--keypoints", "template",
                        "-o", tmp_path / "out", "--no-cache", "--quiet")
    assert code == 2
    assert "refusing to load global" in err and "lfw.bin" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out" / "results.json").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    bin_path = _make_bin(tmp_path / "a.bin", n_pairs=10)
    code, _, err = _run(capsys, "verify", "--weights", tmp_path / "missing.safetensors", "--bin", bin_path,
                        "--keypoints", "template", "-o", tmp_path / "o", "--no-cache", "--quiet")
    assert code == 2 and "weights not found" in err
    bad_lm = tmp_path / "lm.csv"
    bad_lm.write_text("0,1,2,3\n")
    code, _, err = _run(capsys, "verify", "--weights", TINY_KPRPE, "--bin", bin_path, "--landmarks", bad_lm,
                        "-o", tmp_path / "o", "--no-cache", "--quiet")
    assert code == 2 and "lm.csv:1: expected 11 fields" in err


@pytest.mark.slow
def test_sweep_two_checkpoints_plot_and_table(photo_pairs, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, err = _run(
        capsys,
        "sweep",
        "--weights",
        f"kprpe={TINY_KPRPE}",
        "--weights",
        f"vit={TINY_VIT}",
        "--pairs",
        photo_pairs / "pairs.csv",
        "--landmarks",
        photo_pairs / "landmarks.txt",
        "--t",
        "0,0.5,1",
        "-o",
        out,
        "--cache-dir",
        tmp_path / "cache",
        "--quiet",
    )
    assert code == 0, err
    table = json.loads((out / "sweep.json").read_text())
    assert table["t"] == [0.0, 0.5, 1.0] and table["checkpoints"] == ["kprpe", "vit"]
    assert all(len(v) == 3 and all(0 <= a <= 1 for a in v) for v in table["accuracy"].values())
    assert (out / "sweep.png").stat().st_size > 1000
    assert "| t | kprpe | vit |" in (out / "summary.md").read_text()


def test_pairs_with_landmarks_and_t(photo_pairs, tmp_path, capsys):
    out = tmp_path / "pairs"
    code, _, err = _run(
        capsys,
        "pairs",
        "--weights",
        TINY_KPRPE,
        "--pairs",
        photo_pairs / "pairs.csv",
        "--landmarks",
        photo_pairs / "landmarks.txt",
        "--t",
        "1",
        "-o",
        out,
        "--no-cache",
        "--quiet",
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "t=1" and res["sets"]["pairs"]["num_pairs"] == 20


def test_identify_closed_and_open_set(tmp_path, capsys):
    rng = np.random.default_rng(5)
    for role, ids in (("gallery", ["a", "b", "c"]), ("probe", ["a", "b", "c", "z"])):
        for ident in ids:
            for k in range(2 if role == "gallery" else 1):
                image, lm = synthetic_photo(rng, size=112)
                write_rgb(tmp_path / role / ident / f"{k}.png", image)
    for k in range(3):
        write_rgb(tmp_path / "distractors" / f"d{k}.png", synthetic_photo(rng, size=112)[0])
    out = tmp_path / "ident"
    code, _, err = _run(capsys, "identify", "--weights", TINY_KPRPE, "--gallery", tmp_path / "gallery",
                        "--probe", tmp_path / "probe", "--distractors", tmp_path / "distractors",
                        "--keypoints", "template", "--ranks", "1,5", "-o", out, "--no-cache", "--quiet")
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())["sets"]["identification"]
    assert (
        r["num_probes"] == 4
        and r["num_mated_probes"] == 3
        and r["num_gallery"] == 9
        and r["num_distractors"] == 3
    )
    assert set(r["closed_set"]) == {"rank1", "rank5"} and r["closed_set"]["rank5"] >= r["closed_set"]["rank1"]
    assert "open_set" in r


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """`--out` naming an existing file was discovered only after the whole evaluation ran."""
    import kprpe.eval.runs as runs

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(runs, "evaluate_bins", never)
    bin_path = _make_bin(tmp_path / "toy.bin")
    taken = tmp_path / "results"
    taken.write_text("a file, not a folder")
    code, _, err = _run(capsys, "verify", "--weights", TINY_KPRPE, "--bin", bin_path, "-o", taken, "--quiet")
    assert code == 2 and "is an existing file" in err and err.count("\n") == 1
    code, _, err = _run(
        capsys, "verify", "--weights", TINY_KPRPE, "--bin", bin_path, "-o", taken / "sub", "--quiet"
    )
    assert code == 2 and "is a file" in err
    assert taken.read_text() == "a file, not a folder"


@pytest.mark.parametrize("command", ["pairs", "ijb"])
def test_a_t_outside_0_1_is_one_line_naming_the_command(command, tmp_path, capsys):
    from kprpe.cli.main import main

    pairs = tmp_path / "p.csv"
    pairs.write_text("a.png,b.png,1\n")
    extra = ["--pairs", str(pairs)] if command == "pairs" else [
        "--name", "X", "--images", str(tmp_path), "--tid-mid", str(pairs), "--pairs", str(pairs),
        "--landmarks", str(pairs),
    ]
    argv = ["eval", command, "--weights", str(tmp_path / "w.safetensors"), *extra, "-o", str(tmp_path / "o")]
    assert main([*argv, "--t", "2"]) == 2
    assert f"kprpe eval {command}: error: --t must lie in [0, 1], got 2.0" in capsys.readouterr().err


def test_identify_refuses_fractional_ranks(tmp_path, capsys):
    """--ranks 1.5 was cut to rank 1 without a word (toolkit and tinyface refused it)."""
    for role in ("gallery", "probe"):
        (tmp_path / role / "a").mkdir(parents=True)
    code, _, err = _run(capsys, "identify", "--weights", TINY_KPRPE, "--gallery", tmp_path / "gallery",
                        "--probe", tmp_path / "probe", "--ranks", "1.5", "-o", tmp_path / "out", "--quiet")
    assert code == 2 and "--ranks must be positive integers" in err and "1.5" in err
