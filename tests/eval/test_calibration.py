"""Calibrated thresholds: the FAR reached on the pairs never exceeds the target, the file is tied to the
model, and the eval commands write it beside the weights without losing the report when it cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kprpe.cli import main
from kprpe.eval.calibration import (
    CalibrationError,
    calibrate_threshold,
    calibration_path,
    read_calibration,
    resolve_threshold,
    write_calibration,
)
from kprpe.eval.metrics import tar_at_far


def _scores(rng, genuine=400, impostor=2000):
    scores = np.r_[rng.normal(0.6, 0.15, genuine), rng.normal(0.0, 0.1, impostor)]
    labels = np.r_[np.ones(genuine, bool), np.zeros(impostor, bool)]
    return scores, labels


@pytest.mark.parametrize("far", [1e-3, 1e-2, 0.1])
def test_threshold_keeps_the_measured_far_within_the_target(far):
    scores, labels = _scores(np.random.default_rng(0))
    cal = calibrate_threshold(scores, labels, far)
    accepted = scores >= cal["threshold"]
    measured_far = accepted[~labels].mean()
    assert measured_far == pytest.approx(cal["far"]) and measured_far <= far
    assert accepted[labels].mean() == pytest.approx(cal["tar"])
    # the next stricter distinct impostor score would be below target too, the next laxer one above it
    laxer = scores[~labels][scores[~labels] < cal["threshold"]].max()
    assert (scores[~labels] >= laxer).mean() > far
    assert cal["threshold"] == tar_at_far(scores, labels, [far], convention="at_most")[0]["threshold"]
    assert (cal["num_genuine"], cal["num_impostor"]) == (400, 2000)


def test_unresolvable_or_invalid_targets_are_refused():
    scores, labels = _scores(np.random.default_rng(1), impostor=500)
    with pytest.raises(CalibrationError, match="1/500"):
        calibrate_threshold(scores, labels, 1e-4)
    with pytest.raises(CalibrationError, match=r"\(0, 1\)"):
        calibrate_threshold(scores, labels, 1.5)


def test_resolution_order_and_files_for_other_models(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    assert calibration_path(weights) == tmp_path / "model.safetensors.threshold.json"
    assert calibration_path(tmp_path) == tmp_path / "threshold.json"
    choice = resolve_threshold(None, weights, model_fingerprint="f1", flip=True, default=0.3)
    assert (
        choice.threshold == 0.3
        and choice.source.startswith("default")
        and "no calibration file" in choice.source
    )
    scores, labels = _scores(np.random.default_rng(2))
    cal = calibrate_threshold(scores, labels, 1e-2)
    path = write_calibration(weights, cal, model_fingerprint="f1", dataset="toy", protocol="pairs", flip=True)
    stored = read_calibration(path)
    assert (
        stored["threshold"] == cal["threshold"]
        and stored["dataset"] == "toy"
        and stored["model_fingerprint"] == "f1"
    )
    choice = resolve_threshold(None, weights, model_fingerprint="f1", flip=True, default=0.3)
    assert choice.threshold == cal["threshold"] and str(path) in choice.source and "toy" in choice.source
    other = resolve_threshold(None, weights, model_fingerprint="f2", flip=True, default=0.3)
    assert other.threshold == 0.3 and "other weights" in other.source
    no_flip = resolve_threshold(None, weights, model_fingerprint="f1", flip=False, default=0.3)
    assert no_flip.threshold == 0.3 and "flip" in no_flip.source
    explicit = resolve_threshold(0.5, weights, model_fingerprint="f1", flip=True, default=0.3)
    assert (explicit.threshold, explicit.source) == (0.5, "--threshold")
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="threshold.json"):
        resolve_threshold(None, weights, model_fingerprint="f1", flip=True, default=0.3)
    path.write_text(
        json.dumps(
            {
                "format": "kprpe-threshold-v1",
                "model_fingerprint": "f1",
                "far_target": 0.1,
                "threshold": "high",
            }
        )
    )
    with pytest.raises(CalibrationError, match="cosine similarity"):
        read_calibration(path)


def _pairs_set(tmp_path, n_pairs=40):
    """Pre-aligned crops: genuine pairs are the same noise image slightly shifted, impostors differ."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = ["image_a,image_b,label"]
    for k in range(n_pairs):
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        same = k % 2 == 0
        other = np.roll(base, 2, axis=1) if same else rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        Image.fromarray(base).save(tmp_path / f"a{k}.png")
        Image.fromarray(other).save(tmp_path / f"b{k}.png")
        rows.append(f"a{k}.png,b{k}.png,{int(same)}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_eval_pairs_calibrate_writes_the_threshold_beside_the_weights(tmp_path, capsys):
    import kprpe
    from kprpe.face.pipeline import model_fingerprint

    model = kprpe.create_model("vit_tiny_kprpe")
    weights = kprpe.save_model(model, tmp_path / "w" / "tiny.safetensors")
    pairs = _pairs_set(tmp_path)
    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "pairs",
            "--weights",
            str(weights),
            "--pairs",
            str(pairs),
            "--keypoints",
            "template",
            "-o",
            str(out),
            "--no-cache",
            "--quiet",
            "--calibrate",
            "0.1",
        ]
    )
    printed = json.loads(capsys.readouterr().out)  # on a pipe: one line of JSON, the calibration in it
    assert code == 0 and printed["calibration"]["file"] == str(calibration_path(weights))
    stored = read_calibration(calibration_path(weights))
    assert printed["calibration"]["threshold"] == stored["threshold"]
    reported = json.loads((out / "results.json").read_text())["sets"]["pairs"]["calibration"]
    assert stored["threshold"] == reported["threshold"] and stored["far"] <= 0.1
    assert stored["model_fingerprint"] == model_fingerprint(kprpe.load_official(weights))
    assert stored["dataset"] == "pairs" and stored["flip"] is True and stored["num_impostor"] == 20
    # 20 impostors cannot resolve FAR 1e-3: one-line error, but the report is still written
    out2 = tmp_path / "run2"
    code = main(
        [
            "eval",
            "pairs",
            "--weights",
            str(weights),
            "--pairs",
            str(pairs),
            "--keypoints",
            "template",
            "-o",
            str(out2),
            "--no-cache",
            "--quiet",
            "--calibrate",
            "0.001",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "1/20" in err and (out2 / "results.json").is_file()
    assert read_calibration(calibration_path(weights))["far_target"] == 0.1  # the earlier file is untouched
