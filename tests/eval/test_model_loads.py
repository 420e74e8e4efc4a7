"""One ``kprpe eval`` run loads its model once: the embeddings, the parameter count of results.json and the
``--calibrate`` fingerprint share one handle (each built its own before, so the model was loaded twice, and
a repo id's snapshot was resolved and hashed once more per handle)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import kprpe.nn
import kprpe.zoo
from kprpe.cli import main

from .conftest import TINY_KPRPE
from .test_cli import _make_bin


@pytest.fixture
def counted(monkeypatch):
    """Counts model loads (kprpe.nn.load_official) and recognition-weight resolutions (kprpe.zoo.resolve)."""
    counts = {"loads": 0, "resolves": 0}
    load, resolve = kprpe.nn.load_official, kprpe.zoo.resolve

    def counting_load(*args, **kwargs):
        counts["loads"] += 1
        return load(*args, **kwargs)

    def counting_resolve(source, kind="recognition", **kwargs):
        counts["resolves"] += kind == "recognition"
        return resolve(source, kind, **kwargs)

    monkeypatch.setattr(kprpe.nn, "load_official", counting_load)
    monkeypatch.setattr(kprpe.zoo, "resolve", counting_resolve)
    return counts


def _weights(tmp_path, name="tiny.safetensors"):
    """A copy of the tiny checkpoint: --calibrate writes its threshold file beside the weights."""
    return shutil.copy(TINY_KPRPE, tmp_path / name)


def test_verify_with_calibrate_loads_the_model_once(tmp_path, capsys, counted):
    weights = _weights(tmp_path)
    bin_path = _make_bin(tmp_path / "toy.bin")
    argv = ["eval", "verify", "--weights", str(weights), "--bin", str(bin_path), "--keypoints", "template",
            "-o", str(tmp_path / "run"), "--no-cache", "--quiet", "--calibrate", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["calibration"]["file"].startswith(str(tmp_path)) and printed["results"]["parameters"] > 0
    assert counted == {"loads": 1, "resolves": 1}


def test_pairs_with_calibrate_loads_the_model_once(photo_pairs, tmp_path, capsys, counted):
    weights = _weights(tmp_path)
    argv = ["eval", "pairs", "--weights", str(weights), "--pairs", str(photo_pairs / "pairs.csv"),
            "--landmarks", str(photo_pairs / "landmarks.txt"), "-o", str(tmp_path / "run"), "--no-cache",
            "--quiet", "--calibrate", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "calibration" in json.loads(capsys.readouterr().out)
    assert counted == {"loads": 1, "resolves": 1}


def test_verify_of_a_bin_and_a_toolkit_folder_loads_the_model_once(tmp_path, capsys, counted):
    pytest.importorskip("datasets")
    from .test_toolkit import _save_set, _verification_colors

    colors, is_same = _verification_colors(10, seed=4)
    folder = _save_set(tmp_path / "lfw", colors, {"is_same": (is_same, "bool")})
    argv = ["eval", "verify", str(_make_bin(tmp_path / "toy.bin")), str(folder), "--weights", str(TINY_KPRPE),
            "--keypoints", "template", "-o", str(tmp_path / "run"), "--no-cache", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["results"]["sets"].keys() == {"toy", "lfw"}
    assert counted == {"loads": 1, "resolves": 1}


def test_a_weights_file_with_an_equals_sign_is_one_path(tmp_path, capsys):
    """Only a sweep's --weights is NAME=W; elsewhere the '=' split a valid file name into a missing one."""
    weights = _weights(tmp_path, "lr=1e-3.safetensors")
    bin_path = _make_bin(tmp_path / "toy.bin", n_pairs=10)
    argv = ["eval", "verify", "--weights", str(weights), "--bin", str(bin_path), "--keypoints", "template",
            "-o", str(tmp_path / "run"), "--no-cache", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == str(weights) and np.isfinite(results["sets"]["toy"]["kfold"]["accuracy_mean"])
