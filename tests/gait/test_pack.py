"""kprpe gait pack: PNG + pose files -> OpenGait layout, the frame join, bad input, interrupted runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kprpe.cli import main
from kprpe.files import OutputFolderError
from kprpe.gait import GaitDataset, GaitFormatError, load_sequence, read_partition
from kprpe.gait import pack as pack_module
from kprpe.gait.pack import frame_number, pack_sequences, read_pose_file
from kprpe.gait.synthetic import SyntheticConfig, draw_identity, render_walk, walk_sequence

CONFIG = SyntheticConfig(ids=2, sequences_per_id=2, frames=(8, 10), occluder_probability=0.0)


def _write_pose(path: Path, kp: np.ndarray, height: int, width: int) -> None:
    if path.suffix == ".txt":  # Gait3D: one line, two leading numbers (the crop's size), then 17 x (x, y, c)
        path.write_text(",".join(repr(float(v)) for v in [width, height, *kp.ravel()]))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"keypoints": kp.tolist()}))
    else:
        path.write_text("x,y,confidence\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in kp))


def _raw_dataset(root: Path, pose_suffix: str = ".txt") -> dict:
    """Raw per-frame files of synthetic walkers; returns the expected packed arrays per sequence key."""
    expected = {}
    for i in range(CONFIG.ids):
        identity = draw_identity(np.random.default_rng([7, i, 0]))
        for j in range(CONFIG.sequences_per_id):
            rng_args = [7, i, j + 1]
            frames, keypoints, _ = render_walk(identity, np.random.default_rng(rng_args), CONFIG)
            rel = Path(f"{i:04d}", f"camid{j}_videoid0", "seq0")
            for k, (frame, kp) in enumerate(zip(frames, keypoints, strict=True)):
                number = 24551 + 3 * k
                (root / "sils" / rel).mkdir(parents=True, exist_ok=True)
                (root / "poses" / rel).mkdir(parents=True, exist_ok=True)
                Image.fromarray(frame).save(root / "sils" / rel / f"human_crop_f{number}.png")
                _write_pose(root / "poses" / rel / f"human_crop_f{number}{pose_suffix}", kp, *frame.shape)
            sils, pose, _ = walk_sequence(identity, np.random.default_rng(rng_args), CONFIG)
            expected["-".join(rel.parts)] = (sils, pose)
    return expected


@pytest.mark.parametrize("pose_suffix", [".txt", ".json", ".csv"])
def test_pack_matches_the_generator_pretreatment(tmp_path, pose_suffix):
    expected = _raw_dataset(tmp_path, pose_suffix)
    report = pack_sequences(tmp_path / "sils", tmp_path / "out", tmp_path / "poses", seed=3)
    assert report.packed == 4 and report.skipped == [] and report.frames_without_pose == 0
    data = GaitDataset(tmp_path / "out")
    assert len(data) == 4
    for index, ref in enumerate(data.sequences):
        arrays = data.load(index)
        sils, pose = expected[ref.key]
        np.testing.assert_array_equal(arrays["sils"], sils)
        # float32 output from repr()-exact text: identical up to float32 rounding
        np.testing.assert_allclose(arrays["pose"], pose, rtol=0, atol=1e-4)
    partition = read_partition(tmp_path / "out" / "partition.json")
    assert len(partition.test_ids) == 1 and len(partition.probe_set) == 1


def test_frames_join_by_number_when_frames_drop(tmp_path):
    _raw_dataset(tmp_path)
    seq = Path("0000", "camid0_videoid0", "seq0")
    sil_dir, pose_dir = tmp_path / "sils" / seq, tmp_path / "poses" / seq
    # frame 24554 becomes near-empty (dropped); 24560 loses its pose file
    Image.fromarray(np.zeros((128, 112), np.uint8)).save(sil_dir / "human_crop_f24554.png")
    os.remove(pose_dir / "human_crop_f24560.txt")
    kept = sorted(frame_number(p) for p in sil_dir.iterdir() if frame_number(p) != 24554)
    report = pack_sequences(tmp_path / "sils", tmp_path / "out", tmp_path / "poses")
    assert report.dropped_frames == 1 and report.frames_without_pose == 1
    arrays = load_sequence(tmp_path / "out" / seq)
    assert arrays["sils"].shape[0] == arrays["pose"].shape[0] == len(kept)
    missing = kept.index(24560)
    assert np.all(arrays["pose"][missing] == 0)
    # every other frame's keypoints still sit on its own silhouette (a shifted join would not)
    others = [k for k in range(len(kept)) if k != missing]
    pose, sils = arrays["pose"][others], arrays["sils"][others]
    confident = pose[..., 2] >= 0.5
    t = np.broadcast_to(np.arange(len(others))[:, None], confident.shape)
    ix = np.clip(np.round(pose[..., 0]).astype(int), 0, 43)
    iy = np.clip(np.round(pose[..., 1]).astype(int), 0, 63)
    assert np.mean(sils[t, iy, ix][confident] > 0) >= 0.95


def test_interrupted_pack_leaves_only_whole_sequences_and_resumes(tmp_path, monkeypatch):
    _raw_dataset(tmp_path)
    real = pack_module.dump_array_pickle
    calls = []

    def interrupted(path, array):
        calls.append(path)
        if len(calls) == 4:  # sequence 2's second file: after its pose.pkl was written
            raise KeyboardInterrupt
        return real(path, array)

    monkeypatch.setattr(pack_module, "dump_array_pickle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_sequences(tmp_path / "sils", tmp_path / "out", tmp_path / "poses")
    out = tmp_path / "out"
    folders = [p for p in out.rglob("*") if p.is_dir() and len(p.relative_to(out).parts) == 3]
    assert [p.relative_to(out).as_posix() for p in folders] == ["0000/camid0_videoid0/seq0"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["pose.pkl", "sils.pkl"]
    assert not [p for p in out.rglob(".*") if p.name != ".kprpe-gait-pack"]  # no staging leftovers
    assert not (out / "partition.json").exists()
    monkeypatch.setattr(pack_module, "dump_array_pickle", real)
    report = pack_sequences(tmp_path / "sils", out, tmp_path / "poses")
    assert report.resumed == 1 and report.packed == 3
    assert len(GaitDataset(out)) == 4


def test_bad_inputs(tmp_path):
    _raw_dataset(tmp_path)
    seq = Path("0001", "camid1_videoid0", "seq0")
    (tmp_path / "poses" / seq / "human_crop_f24551.txt").write_text("1,2,3")
    (tmp_path / "sils" / "0009" / "t" / "v").mkdir(parents=True)  # an empty sequence folder
    with pytest.raises(OutputFolderError, match="contains the input"):
        pack_sequences(tmp_path / "sils", tmp_path, tmp_path / "poses")
    with pytest.raises(GaitFormatError, match="test fraction"):
        pack_sequences(tmp_path / "sils", tmp_path / "early", tmp_path / "poses", test_fraction=1.5)
    assert not (tmp_path / "early").exists()
    with pytest.raises(GaitFormatError, match="is inside the input"):
        pack_sequences(tmp_path / "sils", tmp_path / "poses" / "packed", tmp_path / "poses")
    assert not (tmp_path / "poses" / "packed").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(OutputFolderError, match="not empty"):
        pack_sequences(tmp_path / "sils", tmp_path / "taken", tmp_path / "poses")
    partition = tmp_path / "p.json"
    partition.write_text(json.dumps({"TRAIN_SET": ["0000", "0005"], "TEST_SET": ["0001"]}))
    with pytest.raises(GaitFormatError, match="1 ids have no silhouette sequence"):
        pack_sequences(tmp_path / "sils", tmp_path / "out", tmp_path / "poses", partition=partition)
    report = pack_sequences(
        tmp_path / "sils", tmp_path / "out", tmp_path / "poses", partition=partition, allow_missing_ids=True
    )
    reasons = {
        Path(path).relative_to(tmp_path / "sils").as_posix(): reason for path, reason in report.skipped
    }
    assert "expected 17 x (x, y, confidence)" in reasons[seq.as_posix()]
    assert reasons["0009/t/v"].startswith("empty sequence")
    assert report.packed == 3
    assert read_partition(tmp_path / "out" / "partition.json").train_ids == ("0000", "0005")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.txt", "1,2,nan", "51 numbers"),
        ("a.txt", "x,y", "not a pose file"),
        ("a.json", '{"points": []}', "'keypoints' key"),
        ("a.json", "[[1, 2]]", "51 numbers"),
        ("a.csv", "x,y,c\n1,2", "51 numbers"),
    ],
)
def test_bad_pose_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(GaitFormatError, match=message):
        read_pose_file(tmp_path / name)


def test_pose_formats_agree(tmp_path):
    kp = np.random.default_rng(0).uniform(0, 100, (17, 3))
    for suffix in (".txt", ".json", ".csv"):
        _write_pose(tmp_path / f"p{suffix}", kp, 120, 80)
        np.testing.assert_array_equal(read_pose_file(tmp_path / f"p{suffix}"), kp)
    (tmp_path / "flat.txt").write_text(" ".join(map(repr, kp.ravel().tolist())))  # 51 numbers, no header
    np.testing.assert_array_equal(read_pose_file(tmp_path / "flat.txt"), kp)
    assert frame_number(Path("human_crop_f24551.png")) == 24551
    assert frame_number(Path("00017_2d_pose.txt")) == 17


def test_links_leaving_the_input_are_not_read(tmp_path):
    _raw_dataset(tmp_path)
    outside = tmp_path / "elsewhere"
    os.rename(tmp_path / "sils" / "0001", outside)
    os.symlink(outside, tmp_path / "sils" / "0001")
    report = pack_sequences(tmp_path / "sils", tmp_path / "out", tmp_path / "poses")
    assert report.packed == 2 and len(report.skipped) == 1 and "leaves the data root" in report.skipped[0][1]


def test_cli_pack(tmp_path, capsys, terminal):
    _raw_dataset(tmp_path)
    (tmp_path / "sils" / "0009" / "t" / "v").mkdir(parents=True)
    args = [
        "gait",
        "pack",
        str(tmp_path / "sils"),
        "--poses",
        str(tmp_path / "poses"),
        "-o",
        str(tmp_path / "o"),
    ]
    assert main([*args, "-q"]) == 1  # one empty sequence skipped
    captured = capsys.readouterr()
    assert "packed 4 sequences" in captured.out and "SKIPPED 1 sequences" in captured.out
    assert main([*args, "-q", "--allow-skipped"]) == 0
    assert "kept 4 from an earlier run" in capsys.readouterr().out
    assert main(["gait", "pack", str(tmp_path / "nothing"), "-o", str(tmp_path / "o2")]) == 2
    assert "kprpe gait pack: error: gait data root not found" in capsys.readouterr().err
