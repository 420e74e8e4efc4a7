"""Partition files, scanning a root, the training dataset, frame samplers and P x K batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kprpe.gait import (
    AllOrderedFrames,
    FixedOrderedFrames,
    GaitDataset,
    GaitFormatError,
    GaitPartition,
    make_partition,
    pk_batches,
    read_partition,
    scan_sequences,
    write_partition,
)

from .conftest import write_sequence


def _write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_partition_round_trip(tmp_path):
    partition = GaitPartition(("0000",), ("0001", "0002"), ("0001-a-b",))
    path = write_partition(tmp_path / "p.json", partition)
    assert read_partition(path) == partition
    assert json.loads(path.read_text()) == {
        "TRAIN_SET": ["0000"],
        "TEST_SET": ["0001", "0002"],
        "PROBE_SET": ["0001-a-b"],
    }


@pytest.mark.parametrize(
    "data, message",
    [
        ({"TEST_SET": []}, "missing TRAIN_SET"),
        ({"TRAIN_SET": [1, 2], "TEST_SET": []}, "list of strings"),
        ({"TRAIN_SET": ["1"], "TEST_SET": ["1"]}, "in both TRAIN_SET and TEST_SET"),
        ({"TRAIN_SET": ["1", "1"], "TEST_SET": []}, "twice"),
        ({"TRAIN_SET": ["1"], "TEST_SET": ["2"], "PROBE_SET": ["1-a-b"]}, "name no TEST_SET id"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_partitions(tmp_path, data, message):
    with pytest.raises(GaitFormatError, match=message):
        read_partition(_write(tmp_path, data))


def test_unreadable_partition(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GaitFormatError, match="not valid JSON"):
        read_partition(tmp_path / "bad.json")
    with pytest.raises(GaitFormatError, match="cannot read"):
        read_partition(tmp_path / "none.json")


def test_make_partition_is_seeded_and_has_one_probe_per_test_id():
    sequences = [(f"{i:02d}", f"t{k}", "v") for i in range(10) for k in range(3)] + [("99", "t0", "v")]
    a = make_partition(sequences, test_fraction=0.5, seed=1)
    assert a == make_partition(sequences, test_fraction=0.5, seed=1)
    assert a != make_partition(sequences, test_fraction=0.5, seed=2)
    assert len(a.test_ids) == 6 and not set(a.test_ids) & set(a.train_ids)
    probe_ids = [p.split("-")[0] for p in a.probe_set]
    assert len(probe_ids) == len(set(probe_ids))  # one per id
    assert set(probe_ids) == set(a.test_ids) - {"99"}  # "99" has one sequence: no gallery match possible


def test_scan_counts_skips(gait_root, tmp_path):
    (gait_root / "0003" / "t" / "empty").mkdir(parents=True)
    (gait_root / "0000" / ".staging-x" / "v").mkdir(parents=True)  # hidden: an interrupted pack's leftovers
    outside = write_sequence(tmp_path / "elsewhere" / "seq", frames=3)
    (gait_root / "0004" / "t").mkdir(parents=True)
    os.symlink(outside, gait_root / "0004" / "t" / "v")
    scan = scan_sequences(gait_root)
    assert [s.key for s in scan.sequences] == [
        "0000-cam0_video0-seq0",
        "0000-cam1_video0-seq0",
        "0000-cam2_video0-seq0",
        "0001-cam0_video0-seq0",
        "0001-cam1_video0-seq0",
        "0002-cam0_video0-seq0",
        "0002-cam1_video0-seq0",
    ]
    reasons = sorted(reason.split(" (")[0] for _, reason in scan.skipped)
    assert reasons == ["a link that leaves the data root", "empty sequence"]
    with pytest.raises(GaitFormatError, match="not found"):
        scan_sequences(tmp_path / "nothing")


def test_dataset_split_labels_and_missing_ids(gait_root, tmp_path):
    partition = _write(tmp_path, {"TRAIN_SET": ["0000", "0002"], "TEST_SET": ["0001"]})
    train = GaitDataset(gait_root, partition, "train")
    assert len(train) == 5 and train.identities == ["0000", "0002"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert {k: v.tolist() for k, v in train.indices_by_label.items()} == {0: [0, 1, 2], 1: [3, 4]}
    item = train[3]
    assert item["label"] == 1 and item["key"] == "0002-cam0_video0-seq0"
    assert item["sils"].shape == (4, 64, 44) and item["pose"].shape == (4, 17, 3)

    missing = _write(tmp_path, {"TRAIN_SET": ["0000", "0042", "0043"], "TEST_SET": ["0001"]}, "m.json")
    with pytest.raises(GaitFormatError, match="2 of the 3 train ids in the partition have no sequence"):
        GaitDataset(gait_root, missing, "train")
    lenient = GaitDataset(gait_root, missing, "train", allow_missing=True)
    assert lenient.missing_ids == ["0042", "0043"] and len(lenient) == 3


def test_dataset_modalities_and_transform(gait_root):
    def flip(item, rng):
        item["sils"] = item["sils"][..., ::-1]
        return item

    data = GaitDataset(gait_root, modalities=("sils",), transform=flip, frames=FixedOrderedFrames(3, 1))
    item = data[0]
    assert set(item) == {"sils", "label", "key"} and item["sils"].shape == (3, 64, 44)
    with pytest.raises(GaitFormatError, match="no modality 'depth'"):
        GaitDataset(gait_root, modalities=("depth",))[0]


def test_fixed_ordered_frames():
    sampler = FixedOrderedFrames(num=30, skip=4)
    rng = np.random.default_rng(0)
    for length in (5, 33, 34, 100):
        for _ in range(20):
            frames = sampler(length, rng)
            assert frames.shape == (30,) and frames.min() >= 0 and frames.max() < length
            if length >= 34:  # one contiguous run of 34, kept in order
                assert np.all(np.diff(frames) > 0) and frames[-1] - frames[0] <= 33
    assert AllOrderedFrames(limit=10)(25, rng).tolist() == list(range(10))
    assert AllOrderedFrames(limit=None)(3, rng).tolist() == [0, 1, 2]


def test_pk_batches():
    groups = {0: np.array([0, 1, 2]), 1: np.array([3]), 2: np.array([4, 5]), 3: np.array([6, 7, 8, 9])}
    batches = pk_batches(groups, p=3, k=2, rng=np.random.default_rng(0))
    label_of = {i: label for label, idx in groups.items() for i in idx}
    for _ in range(20):
        batch = next(batches)
        labels = [label_of[i] for i in batch]
        assert len(batch) == 6 and len(set(labels)) == 3
        assert all(labels[2 * j] == labels[2 * j + 1] for j in range(3))  # label-major, K each
    with pytest.raises(GaitFormatError, match="only 4"):
        next(pk_batches(groups, p=5, k=2, rng=np.random.default_rng(0)))
