from __future__ import annotations

import numpy as np
import pytest
import torch

from kprpe.data import (
    DataError,
    FaceDataset,
    FolderSource,
    LandmarkFileError,
    RecordSource,
    ResumableSampler,
    decode_image,
    pack_folder,
    read_landmarks,
    write_landmarks,
)
from kprpe.data.pack import compute_landmarks
from kprpe.data.transforms import AugmentConfig


def test_pack_keeps_images_labels_and_insightface_layout(synthetic_data):
    folder_src, rec_src = FolderSource(synthetic_data["folder"]), RecordSource(synthetic_data["rec"])
    assert len(folder_src) == len(rec_src) == 24 * 8
    assert rec_src.declared_num_classes == folder_src.declared_num_classes == 24
    header = rec_src.reader.read_header(0)
    assert header.flag == 2 and header.label == (193.0, 217.0)
    assert rec_src.reader.read_header(193 + 5).label == (
        41.0,
        49.0,
    )  # identity 5: its (first, end) image keys
    for i in (0, 57, 191):
        a, la = folder_src.get(i)
        b, lb = rec_src.get(i)
        assert la == lb == i // 8
        assert np.array_equal(decode_image(a, "a"), decode_image(b, "b"))


def test_pack_reports_unreadable_images(tmp_path, synthetic_data):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(synthetic_data["folder"], folder)
    (folder / "id_0001" / "img_003.png").write_bytes(b"not an image")
    (folder / "id_0002" / "notes.txt").write_text("hi")
    report = pack_folder(folder, tmp_path / "out.rec", progress=False)
    assert report.num_images == 24 * 8 - 1
    assert [f for f, _ in report.failures] == ["id_0001/img_003.png"]
    assert report.ignored == ["id_0002/notes.txt"]
    assert "cannot decode" in report.failures[0][1]


def test_landmark_file_round_trip_and_errors(tmp_path):
    kp = np.random.default_rng(0).uniform(0, 1, size=(4, 5, 2))
    kp[2] = np.nan  # no landmarks for sample 2: no row
    path = write_landmarks(tmp_path / "l.csv", np.arange(4), kp)
    lines = path.read_text().splitlines()
    assert lines[0] == "idx,ldmk_0,ldmk_1,ldmk_2,ldmk_3,ldmk_4,ldmk_5,ldmk_6,ldmk_7,ldmk_8,ldmk_9"
    assert len(lines) == 4 and lines[1].split(",")[1] == f"{kp[0, 0, 0]:.6f}"
    back = read_landmarks(path, num_samples=4)
    assert np.allclose(back[[0, 1, 3]], kp[[0, 1, 3]], atol=1e-6) and np.isnan(back[2]).all()
    (tmp_path / "bad.csv").write_text(lines[0] + "\n0,1,2,3\n")
    with pytest.raises(LandmarkFileError, match=r"bad.csv:2: expected 11 fields"):
        read_landmarks(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("\n".join([lines[0], lines[1], lines[1]]))
    with pytest.raises(LandmarkFileError, match="appears twice"):
        read_landmarks(tmp_path / "dup.csv")
    with pytest.raises(LandmarkFileError, match="outside the data set"):
        read_landmarks(path, num_samples=2)
    (tmp_path / "hdr.csv").write_text("id,x\n")
    with pytest.raises(LandmarkFileError, match="header must start"):
        read_landmarks(tmp_path / "hdr.csv")


def test_dataset_items_and_missing_landmarks(synthetic_data, tmp_path):
    ds = FaceDataset(synthetic_data["rec"], image_size=32, landmarks=synthetic_data["landmarks"])
    item = ds[10]
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].item() == 1 and item["valid"].item()
    assert torch.allclose(
        item["keypoints"], torch.from_numpy(read_landmarks(synthetic_data["landmarks"])[10]), atol=1e-5
    )
    a, b = ds[(10, (0, 0, 5))], ds[(10, (0, 0, 5))]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["keypoints"], b["keypoints"])  # seeded
    lines = synthetic_data["landmarks"].read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[:1] + lines[1:5] + lines[7:]) + "\n")  # samples 4 and 5 missing
    with pytest.raises(DataError, match=r"2 of 192 samples have no landmarks \(first: 4, 5\)"):
        FaceDataset(synthetic_data["rec"], image_size=32, landmarks=partial)
    ds2 = FaceDataset(synthetic_data["rec"], image_size=32, landmarks=partial, missing_landmarks="template")
    assert ds2.num_missing_landmarks == 2


def test_damaged_samples_raise_or_are_flagged(synthetic_data, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(synthetic_data["folder"], folder)
    (folder / "id_0000" / "img_002.png").write_bytes(b"\x89PNG broken")
    ds = FaceDataset(folder, image_size=32, on_error="raise")
    with pytest.raises(DataError, match=r"img_002.png \(sample 2\)"):
        ds[2]
    flagged = FaceDataset(folder, image_size=32, on_error="replace")[2]
    assert not flagged["valid"].item() and flagged["index"].item() == 2


def test_sampler_shards_the_global_batch_and_resumes():
    single = ResumableSampler(50, 8, seed=3)
    ranks = [ResumableSampler(50, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    assert single.micro_batches_per_epoch == ranks[0].micro_batches_per_epoch == 6
    flat = list(single)
    per_rank = [list(s) for s in ranks]
    for j in range(6):  # global micro-batch j = rank 0's part then rank 1's part
        assert flat[8 * j : 8 * j + 8] == per_rank[0][4 * j : 4 * j + 4] + per_rank[1][4 * j : 4 * j + 4]
    assert len({i for i, _ in flat}) == 48  # no sample twice in an epoch
    single.set_epoch(0, start_micro_batch=2)
    assert list(single) == flat[16:]
    single.set_epoch(1)
    assert [i for i, _ in single] != [i for i, _ in flat]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(10, 8, world_size=2)


def test_compute_landmarks_reports_failures(synthetic_data, tmp_path):
    truth = read_landmarks(synthetic_data["landmarks"])

    def detect(image):
        idx = detect.calls
        detect.calls += 1
        if idx == 3:
            return None
        if idx == 4:
            raise RuntimeError("backend crashed")
        return truth[idx]

    detect.calls = 0
    report = compute_landmarks(synthetic_data["rec"], tmp_path / "l.csv", detect, progress=False, limit=10)
    assert report.num_samples == 10 and report.num_found == 8
    assert [i for i, _ in report.failures] == [3, 4] and "backend crashed" in report.failures[1][1]
    back = read_landmarks(tmp_path / "l.csv", num_samples=10)
    assert np.isnan(back[3]).all() and np.allclose(back[5], truth[5], atol=1e-5)


def test_augment_config_validation():
    with pytest.raises(ValueError, match="augmentation.flip_p is a probability"):
        AugmentConfig(flip_p=1.5).validate()
    with pytest.raises(ValueError, match="scale_min <= scale_max"):
        AugmentConfig(scale_min=1.2, scale_max=0.9).validate()
def test_training_landmarks_that_are_not_utf8_are_a_landmark_error(tmp_path):
    from kprpe.landmarks import LandmarkFileError, read_landmarks

    path = tmp_path / "landmarks.csv"
    path.write_bytes(b"idx,ldmk_0,ldmk_1\n0,\xff\xfe\n")
    with pytest.raises(LandmarkFileError, match="not UTF-8"):
        read_landmarks(path, num_samples=1)
