"""Calibration files and ``--calibrate`` (issue 32 item 12, issue 24 item 7): every field a command reads is
type-checked when the file is read, and ``eval verify --calibrate`` counts positional sets and toolkit folders
before any work."""

from __future__ import annotations

import json
import shutil

import pytest

from kprpe.cli import main
from kprpe.eval import runs
from kprpe.thresholds import CalibrationError, calibration_path, read_calibration, resolve_threshold

from .conftest import TINY_KPRPE
from .test_cli import _make_bin

GOOD = {
    "format": "kprpe-threshold-v1",
    "model_fingerprint": "f1",
    "far_target": 0.01,
    "threshold": 0.4,
    "tar": 0.9,
    "flip": True,
    "dataset": "lfw",
}

BAD_FIELDS = {
    "far_target text": ("far_target", "abc", "far_target must be a false-accept rate"),
    "far_target null": ("far_target", None, "far_target must be a false-accept rate"),
    "far_target NaN": ("far_target", float("nan"), "far_target must be a false-accept rate"),
    "tar text": ("tar", "high", "tar must be a rate"),
    "tar null": ("tar", None, "tar must be a rate"),
    "flip as a string": ("flip", "false", "flip must be true or false"),
    "integer fingerprint": ("model_fingerprint", 7, "model_fingerprint must be text"),
    "dataset a list": ("dataset", ["a"], "dataset must be text"),
}


def _weights_with_calibration(tmp_path, payload: dict):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    calibration_path(weights).write_text(json.dumps(payload))
    return weights


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_fields_of_the_wrong_kind_are_refused_when_read(tmp_path, case):
    """verify, search query and serve all go through resolve_threshold: each got a TypeError or formatted a
    string as a number; "false" (a string) was read as true."""
    key, value, message = BAD_FIELDS[case]
    weights = _weights_with_calibration(tmp_path, {**GOOD, key: value})
    with pytest.raises(CalibrationError, match=message):
        read_calibration(calibration_path(weights))
    with pytest.raises(CalibrationError, match=message):
        resolve_threshold(None, weights, model_fingerprint="f1", flip=False, default=0.3)


def test_a_good_file_is_used_and_flip_false_is_respected(tmp_path):
    weights = _weights_with_calibration(tmp_path, {**GOOD, "flip": False})
    assert resolve_threshold(None, weights, model_fingerprint="f1", flip=False, default=0.3).threshold == 0.4
    ignored = resolve_threshold(None, weights, model_fingerprint="f1", flip=True, default=0.3)
    assert ignored.threshold == 0.3 and "flip=False" in ignored.source


def _no_work(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before the option error")

    monkeypatch.setattr(runs, "evaluate_bins", never)


def test_calibrate_counts_positional_sets_before_any_work(tmp_path, capsys, monkeypatch):
    a, b = _make_bin(tmp_path / "a.bin", n_pairs=10), _make_bin(tmp_path / "b.bin", n_pairs=10, seed=1)
    _no_work(monkeypatch)
    out = tmp_path / "run"
    code = main(
        ["eval", "verify", "--weights", str(TINY_KPRPE), str(a), str(b), "--calibrate", "0.5", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--calibrate needs exactly one set" in err and "got 2" in err
    assert "Traceback" not in err and not out.exists()
    code = main(
        [
            "eval",
            "verify",
            "--weights",
            str(TINY_KPRPE),
            str(a),
            "--bin",
            str(b),
            "--calibrate",
            "0.5",
            "-o",
            str(out),
        ]
    )
    assert code == 2 and "got 2" in capsys.readouterr().err


def test_calibrate_with_one_positional_bin_writes_the_file(tmp_path, capsys):
    weights = tmp_path / "w" / "tiny.safetensors"
    weights.parent.mkdir()
    shutil.copy(TINY_KPRPE, weights)
    a = _make_bin(tmp_path / "a.bin", n_pairs=10)
    code = main(
        [
            "eval",
            "verify",
            "--weights",
            str(weights),
            str(a),
            "--keypoints",
            "template",
            "--calibrate",
            "0.5",
            "-o",
            str(tmp_path / "run"),
            "--no-cache",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stored = read_calibration(calibration_path(weights))
    assert stored["dataset"] == "a" and stored["far_target"] == 0.5 and stored["far"] <= 0.5


def test_calibrate_on_toolkit_sets(tmp_path, capsys):
    """A toolkit verification set calibrates like a .bin (it used to end in a KeyError after the whole run);
    a TinyFace set has no pairs and is refused before any embedding."""
    pytest.importorskip("datasets")
    from .test_toolkit import _save_set, _tinyface_toolkit, _verification_colors

    weights = tmp_path / "w" / "tiny.safetensors"
    weights.parent.mkdir()
    shutil.copy(TINY_KPRPE, weights)
    colors, is_same = _verification_colors(10, seed=4)
    lfw = _save_set(tmp_path / "val" / "lfw", colors, {"is_same": (is_same, "bool")})
    common = [
        "--weights",
        str(weights),
        "--keypoints",
        "template",
        "--no-cache",
        "--quiet",
        "--calibrate",
        "0.5",
    ]
    code = main(["eval", "verify", str(lfw), *common, "-o", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert read_calibration(calibration_path(weights))["dataset"] == "lfw"
    tiny = _tinyface_toolkit(tmp_path / "val" / "tinyface")
    code = main(["eval", "verify", str(tmp_path / "val"), *common, "-o", str(tmp_path / "run2")])
    assert code == 2 and "got 2" in capsys.readouterr().err  # a folder of two sets counts as two
    code = main(["eval", "verify", str(tiny), *common, "-o", str(tmp_path / "run3")])
    err = capsys.readouterr().err
    assert code == 2 and "needs verification pairs" in err and "Traceback" not in err


def test_calibrate_with_the_onnx_engine_writes_the_engines_fingerprint(tmp_path, capsys):
    """It loaded the .onnx file as a PyTorch checkpoint after the whole evaluation (an error, no file)."""
    pytest.importorskip("onnxruntime")
    from kprpe.export import OnnxEngine, export_onnx

    weights = tmp_path / "w" / "tiny.onnx"
    export_onnx(TINY_KPRPE, weights, check=False)
    a = _make_bin(tmp_path / "a.bin", n_pairs=10)
    code = main(
        [
            "eval",
            "verify",
            "--weights",
            str(weights),
            "--engine",
            "onnx",
            str(a),
            "--keypoints",
            "template",
            "--calibrate",
            "0.5",
            "-o",
            str(tmp_path / "run"),
            "--no-cache",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    stored = read_calibration(calibration_path(weights))
    assert stored["model_fingerprint"] == OnnxEngine(weights).fingerprint
