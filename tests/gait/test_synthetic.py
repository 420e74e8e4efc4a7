"""Synthetic walkers: determinism, keypoints on the silhouettes, misalignment with keypoints following, and
identity living in the motion rather than in one frame's static shape."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from kprpe.cli import main
from kprpe.gait import GaitDataset, load_sequence, read_partition
from kprpe.gait.synthetic import SyntheticConfig, draw_identity, make_synthetic, walk_sequence


def _on_foreground(sils: np.ndarray, pose: np.ndarray, threshold: float = 0.5) -> tuple[int, int]:
    """(confident joints whose nearest pixel is foreground, confident joints)."""
    confident = pose[..., 2] >= threshold
    t = np.broadcast_to(np.arange(len(sils))[:, None], confident.shape)
    ix, iy = np.round(pose[..., 0]).astype(int), np.round(pose[..., 1]).astype(int)
    inside = (ix >= 0) & (ix < sils.shape[2]) & (iy >= 0) & (iy < sils.shape[1])
    hit = np.zeros_like(confident)
    hit[inside] = sils[t[inside], iy[inside], ix[inside]] > 0
    return int((hit & confident).sum()), int(confident.sum())


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(tmp_path):
    config = SyntheticConfig(ids=3, sequences_per_id=2, frames=(6, 9), seed=5)
    make_synthetic(tmp_path / "a", config)
    make_synthetic(tmp_path / "b", config, workers=2)  # process pool: the same bytes
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    assert len([k for k in first if k.endswith("sils.pkl")]) == 6
    make_synthetic(tmp_path / "c", SyntheticConfig(ids=3, sequences_per_id=2, frames=(6, 9), seed=6))
    other = _files(tmp_path / "c")
    assert [v for k, v in other.items() if k.endswith(".pkl")] != [
        v for k, v in first.items() if k.endswith(".pkl")
    ]
    # one random stream per (identity, sequence): more walkers do not change the first ones
    make_synthetic(tmp_path / "d", SyntheticConfig(ids=4, sequences_per_id=2, frames=(6, 9), seed=5))
    more = _files(tmp_path / "d")
    assert all(more[k] == v for k, v in first.items() if k.startswith("0000"))


@pytest.mark.parametrize("misalign", [False, True])
def test_confident_joints_fall_on_the_silhouette(tmp_path, misalign):
    config = SyntheticConfig(ids=6, sequences_per_id=3, seed=1, misalign=misalign, occluder_probability=0.5)
    report = make_synthetic(tmp_path / "w", config)
    hits = total = 0
    data = GaitDataset(tmp_path / "w")
    for index in range(len(data)):
        arrays = data.load(index)
        assert arrays["sils"].shape[1:] == (64, 44) and arrays["pose"].dtype == np.float32
        h, n = _on_foreground(arrays["sils"], arrays["pose"])
        hits, total = hits + h, total + n
    assert report.sequences == 18 and total > 5000
    assert hits / total >= 0.95, hits / total
    # ... and the low-confidence ones are not: dropout and occlusion make confidence mean something
    low_hits = low_total = 0
    for index in range(len(data)):
        arrays = data.load(index)
        pose = arrays["pose"].copy()
        low = pose[..., 2] < 0.3
        pose[..., 2] = np.where(low, 1.0, 0.0)
        h, n = _on_foreground(arrays["sils"], pose)
        low_hits, low_total = low_hits + h, low_total + n
    assert low_total > 50 and low_hits / low_total < 0.9


def test_misalign_moves_silhouettes_and_keypoints_together():
    identity = draw_identity(np.random.default_rng([0, 0, 0]))
    base = SyntheticConfig(ids=2, seed=0)
    shifted = SyntheticConfig(ids=2, seed=0, misalign=True)
    centres = []
    for j in range(6):
        sils, pose, _ = walk_sequence(identity, np.random.default_rng([0, 0, j + 1]), base)
        moved_sils, moved_pose, nuisances = walk_sequence(
            identity, np.random.default_rng([0, 0, j + 1]), shifted
        )
        warp = nuisances["misalign"]
        scale = warp["scale"]
        offset = np.array([21.5, 31.5]) * (1 - scale) + [warp["shift_x"], warp["shift_y"]]
        matrix = np.array([[scale, 0, offset[0]], [0, scale, offset[1]]])
        expected = np.stack([cv2.warpAffine(f, matrix, (44, 64), flags=cv2.INTER_LINEAR) for f in sils])
        np.testing.assert_array_equal(moved_sils, expected)
        # float32 storage of coordinates below 100: 1e-5 absolute
        np.testing.assert_allclose(moved_pose[..., :2], pose[..., :2] * scale + offset, atol=1e-4)
        np.testing.assert_array_equal(moved_pose[..., 2], pose[..., 2])
        ys, xs = np.nonzero(moved_sils.mean(0))
        centres.append((xs.mean(), ys.mean(), np.ptp(ys)))
    centres = np.array(centres)
    assert centres[:, 0].std() > 1.0 and centres[:, 2].std() > 1.0  # position and height vary per sequence


def _static_features(sils, pose, rng):
    """One random frame's silhouette, 16 x 11 (static shape, no motion)."""
    k = rng.integers(len(sils))
    return cv2.resize(sils[k], (11, 16), interpolation=cv2.INTER_AREA).ravel() / 255.0


def _motion_features(sils, pose, rng):
    """Body keypoints relative to the hip centre over time: each coordinate's spread, and for arms and legs
    (x and y apart) the autocorrelation at lags 1..39 (cycle period and shape, whatever the start phase)."""
    hips = pose[:, 11:13, :2].mean(1, keepdims=True)
    signal = (pose[:, 5:, :2] - hips) / np.ptp(pose[:, :, 1], axis=1).mean()  # [T, 12, 2]
    signal = signal - signal.mean(0)
    features = [signal.reshape(len(signal), -1).std(0)]
    for limb in ([4, 5, 6, 7], [8, 9, 10, 11]):  # elbows + wrists, knees + ankles
        for axis in (0, 1):
            s = signal[:, limb, axis]
            scale = s.var(0).mean() + 1e-9
            features.append(np.array([(s[lag:] * s[:-lag]).mean() / scale for lag in range(1, 40)]))
    return np.concatenate(features)


@pytest.mark.slow  # ~4 s on 2 idle cores (72 walks of 40-50 frames), 20-30 s on this shared loaded machine
def test_identity_lives_in_the_motion_not_in_one_frame():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ids, per_id = 12, 6
    config = SyntheticConfig(ids=ids, sequences_per_id=per_id, frames=(40, 50), views=(60, 90, 120), seed=0)
    sequences = []
    for i in range(ids):
        identity = draw_identity(np.random.default_rng([0, i, 0]))
        for j in range(per_id):
            sils, pose, _ = walk_sequence(identity, np.random.default_rng([0, i, j + 1]), config)
            sequences.append((i, j, sils, pose))
    labels = np.array([s[0] for s in sequences])
    train = np.array([s[1] for s in sequences]) < per_id // 2  # half the walks of every id train
    accuracy = {}
    for name, features in (("static", _static_features), ("motion", _motion_features)):
        rng = np.random.default_rng(1)
        x = np.array([features(s[2], s[3], rng) for s in sequences])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(
            x[train], labels[train]
        )
        accuracy[name] = model.score(x[~train], labels[~train])
    # chance is 1/12 = 0.08. Measured here: static 0.28, motion 0.83 on 36 test walks (one walk = 0.028);
    # the bounds leave several walks of room for rendering that differs by a pixel on another CPU
    assert accuracy["motion"] >= 0.6, accuracy
    assert accuracy["static"] <= 0.4, accuracy
    assert accuracy["motion"] >= 2 * accuracy["static"], accuracy


def test_cli_make_synthetic(tmp_path, capsys, terminal):
    out = tmp_path / "walkers"
    args = [
        "gait",
        "make-synthetic",
        "-o",
        str(out),
        "--ids",
        "3",
        "--sequences",
        "2",
        "--frames",
        "5,7",
        "-q",
    ]
    assert main(args) == 0
    assert "wrote 6 sequences" in capsys.readouterr().out
    partition = read_partition(out / "partition.json")
    assert len(partition.train_ids) + len(partition.test_ids) == 3
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["config"]["ids"] == 3 and len(meta["sequences"]) == 6
    key = next(iter(meta["sequences"]))
    identity, seq_type, view = key.split("-")
    assert load_sequence(out / identity / seq_type / view)["sils"].shape[0] >= 5
    assert main(args) == 0  # its own earlier output is replaced as a whole
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    assert main([*args[:3], str(tmp_path / "user"), *args[4:]]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--views", "200"]) == 2
    assert "camera yaws in [0, 180]" in capsys.readouterr().err
    assert main([*args, "--test-fraction", "1"]) == 2
    assert "test fraction must be in (0, 1)" in capsys.readouterr().err
    assert main([*args, "--frames", "1,3"]) == 2
    assert "2 <= low <= high" in capsys.readouterr().err
