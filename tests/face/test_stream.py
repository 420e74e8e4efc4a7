"""Streaming ``kprpe embed``: videos sampled at --fps, worker processes, resumable Parquet/.npz outputs,
failures listed, memory bounded by the batch (kprpe.streaming.stream, kprpe.streaming.shards)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from kprpe.cli import main
from kprpe.face import FaceEmbedder, FacePipeline
from kprpe.streaming.shards import HEADER, read_embeddings
from kprpe.streaming.stream import StreamStats, stream_embeddings
from kprpe.streaming.video import sample_frames

from .conftest import TINY_WEIGHTS, run_cli

pytest.importorskip("dlib")
run = run_cli
W = str(TINY_WEIGHTS)


def _rows(path) -> dict:
    data = read_embeddings(path)
    return {name: i for i, name in enumerate(data["name"].tolist())}, data


# ------------------------------------------------------------------------------------------------ video


def test_video_frames_are_sampled_at_fps_with_their_frame_numbers(capsys, clip, tmp_path):
    out = tmp_path / "v.parquet"
    code, payload, _ = run(
        capsys, "embed", str(clip), "--fps", "2", "--weights", W, "-o", str(out), "-q", "--workers", "0"
    )
    assert code == 0, payload
    data = read_embeddings(out)
    assert data["frame"].tolist() == [0, 5, 10, 15]  # 2 s at 10 fps, one frame per half second
    np.testing.assert_allclose(data["time"], [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    assert set(data["file"].tolist()) == {str(clip)}
    assert [n.rsplit("@", 1)[1] for n in data["name"]] == ["0", "5", "10", "15"]
    assert payload["frames"] == 4 and payload["embedded"] == 4 and payload["files"] == 1
    # the landmarks are in frame pixels (inside the 256 x 256 frame) and the box holds them
    assert (
        data["landmarks"].shape == (4, 5, 2)
        and (data["landmarks"] > 0).all()
        and (data["landmarks"] < 256).all()
    )
    box = data["box"]
    assert (box[:, 0] < data["landmarks"][:, :, 0].min(1)).all() and (
        box[:, 2] > data["landmarks"][:, :, 0].max(1)
    ).all()
    np.testing.assert_allclose(np.linalg.norm(data["embedding"], axis=1), 1.0, atol=1e-5)


def test_video_segments_give_the_frames_of_one_pass(clip):
    whole = [f.number for f in sample_frames(clip, fps=3, segment_frames=100)]
    pieces = [
        f.number
        for segment in range(8)
        for f in sample_frames(clip, fps=3, segment=segment, segment_frames=1)
    ]
    assert whole == pieces and len(whole) == 6  # bins of 1/3 s over 2 s: frames 0, 4, 7, 10, 14, 17
    assert whole == [0, 4, 7, 10, 14, 17]


def test_video_split_into_segments_matches_one_task(clip, dlib_detector, embedder):
    pipeline = FacePipeline(dlib_detector)
    one = list(stream_embeddings([clip], pipeline=pipeline, embedder=embedder, fps=4, progress=False))
    split = list(
        stream_embeddings(
            [clip], pipeline=pipeline, embedder=embedder, fps=4, segment_frames=2, progress=False, workers=0
        )
    )
    assert len(one) == 1 and len(split) == 4  # 8 sampled frames: one task, or four tasks of two
    frames = [row.frame for task in one for row in task.rows]
    assert frames == [row.frame for task in split for row in task.rows] == [0, 3, 5, 8, 10, 13, 15, 18]
    np.testing.assert_allclose(
        np.stack([r.embedding for t in one for r in t.rows]),
        np.stack([r.embedding for t in split for r in t.rows]),
        atol=1e-6,
    )


def test_bad_video_is_a_listed_failure(capsys, clip, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    out = tmp_path / "v.parquet"
    code, payload, err = run(
        capsys, "embed", str(broken), str(clip), "--weights", W, "-o", str(out), "-q", "--workers", "0"
    )
    assert code == 1
    assert [f["file"] for f in payload["failures"]] == [str(broken)]
    assert "not a video" in payload["failures"][0]["reason"] and "broken.mp4" in err
    assert payload["embedded"] == 2  # the good clip at 1 fps


# --------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_an_interrupted_run_resumes_without_duplicate_or_missing_rows(
    capsys, many_photos, tmp_path, monkeypatch, suffix
):
    options = ["--weights", W, "--batch-size", "2", "--shard-rows", "2", "--workers", "0", "-q"]
    whole = tmp_path / f"whole{suffix}"
    assert run(capsys, "embed", str(many_photos), "-o", str(whole), *options)[0] == 0
    out = tmp_path / f"cut{suffix}"
    calls = {"n": 0}
    real = FaceEmbedder.embed_crops

    def dies_on_third_batch(self, crops, keypoints):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for Ctrl-C or a killed process in the middle of the run
        return real(self, crops, keypoints)

    monkeypatch.setattr(FaceEmbedder, "embed_crops", dies_on_third_batch)
    assert main(["embed", str(many_photos), "-o", str(out), *options]) == 130
    capsys.readouterr()
    monkeypatch.setattr(FaceEmbedder, "embed_crops", real)
    if suffix == ".npz":
        assert not out.exists()  # the single file appears only when the run completes
        staged = tmp_path / f".{out.name}.parts"
        assert len(list(staged.glob("part-*.npz"))) == 2  # two batches of two faces were committed
    else:
        assert len(read_embeddings(out)["name"]) == 4
    calls["n"] = 0
    code, payload, _ = run(capsys, "embed", str(many_photos), "-o", str(out), *options)
    assert code == 0 and payload["resumed"] is True
    assert payload["skipped_files"] == 4 and payload["embedded"] == 4 and payload["rows"] == 8
    index_whole, first = _rows(whole)
    index_cut, second = _rows(out)
    assert len(index_cut) == len(second["name"]) == 8  # no duplicates
    assert index_cut.keys() == index_whole.keys()  # nothing missing
    order = [index_cut[name] for name in index_whole]
    np.testing.assert_allclose(second["embedding"][order], first["embedding"], atol=1e-6)
    np.testing.assert_allclose(second["landmarks"][order], first["landmarks"], atol=1e-4)
    assert not list(tmp_path.glob(".*.parts"))  # staging cleaned up
    # a third run has nothing to do and keeps every row
    code, payload, _ = run(capsys, "embed", str(many_photos), "-o", str(out), *options)
    assert code == 0 and payload["embedded"] == 0 and payload["rows"] == 8


def test_another_models_output_is_refused_and_kept(capsys, photo_dir, tmp_path):
    import torch

    import kprpe

    model = kprpe.load_official(TINY_WEIGHTS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    other = kprpe.save_model(model, tmp_path / "other.safetensors")
    for out in (tmp_path / "e.parquet", tmp_path / "e.npz"):
        assert (
            run(capsys, "embed", str(photo_dir), "--weights", W, "-o", str(out), "-q", "--workers", "0")[0]
            == 0
        )
        before = read_embeddings(out)
        code, payload, err = run(
            capsys, "embed", str(photo_dir), "--weights", str(other), "-o", str(out), "-q", "--workers", "0"
        )
        assert code == 2 and payload is None and "another model" in err and "--overwrite" in err
        code, _, err = run(
            capsys,
            "embed",
            str(photo_dir),
            "--weights",
            W,
            "--no-flip",
            "-o",
            str(out),
            "-q",
            "--workers",
            "0",
        )
        assert code == 2 and "other options" in err and "flip" in err
        after = read_embeddings(out)
        np.testing.assert_array_equal(after["embedding"], before["embedding"])
        code, payload, _ = run(
            capsys,
            "embed",
            str(photo_dir),
            "--weights",
            str(other),
            "-o",
            str(out),
            "-q",
            "--workers",
            "0",
            "--overwrite",
        )
        assert code == 0 and payload["rows"] == 2 and payload["resumed"] is False
        assert not np.allclose(read_embeddings(out)["embedding"], before["embedding"])


def test_files_it_did_not_write_are_never_replaced(capsys, photo_dir, tmp_path):
    foreign = tmp_path / "mine.npz"
    foreign.write_bytes(b"precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for out in (foreign, folder):
        code, _, err = run(
            capsys,
            "embed",
            str(photo_dir),
            "--weights",
            W,
            "-o",
            str(out),
            "-q",
            "--workers",
            "0",
            "--overwrite",
        )
        assert code == 2 and ("not a kprpe" in err or "not written by kprpe" in err)
    assert foreign.read_bytes() == b"precious" and (folder / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- failures, workers


def test_failures_are_listed_in_the_output_and_on_stderr(capsys, many_photos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not a picture")
    Image.new("RGB", (90, 90), (0, 0, 255)).save(bad / "blue.png")
    out = tmp_path / "e.parquet"
    argv = [
        "embed",
        str(bad / "notes.png"),
        str(many_photos / "p0.png"),
        str(bad / "blue.png"),
        "--weights",
        W,
        "-o",
        str(out),
        "-q",
        "--workers",
        "0",
    ]
    code, payload, err = run(capsys, *argv)
    assert code == 1 and payload["embedded"] == 1
    assert sorted(f["file"] for f in payload["failures"]) == sorted(
        [str(bad / "notes.png"), str(bad / "blue.png")]
    )
    assert "skipped" in err and "notes.png" in err and "blue.png" in err
    assert sorted(f for f, _ in read_embeddings(out)["failures"]) == sorted(
        f["file"] for f in payload["failures"]
    )
    assert len(json.loads((out / HEADER).read_text())["failures"]) == 2
    code, payload, _ = run(capsys, *argv)  # a re-run still lists them (they are not retried)
    assert code == 1 and len(payload["failures"]) == 2 and payload["embedded"] == 0


@pytest.mark.slow  # starting worker processes takes seconds each on a loaded machine
def test_worker_processes_give_the_same_rows_as_in_process(capsys, many_photos, clip, tmp_path):
    rows = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.parquet"
        code, payload, _ = run(
            capsys,
            "embed",
            str(many_photos),
            str(clip),
            "--weights",
            W,
            "-o",
            str(out),
            "-q",
            "--workers",
            workers,
            "--batch-size",
            "3",
            "--fps",
            "4",
        )
        assert code == 0 and payload["embedded"] == 16
        rows[workers] = read_embeddings(out)
    for column in ("name", "file", "frame", "face_index"):
        assert rows["0"][column].tolist() == rows["2"][column].tolist()
    for column in ("embedding", "norm", "box", "landmarks", "keypoints", "score"):
        np.testing.assert_allclose(rows["0"][column], rows["2"][column], atol=1e-6)


@pytest.mark.slow
def test_video_segments_spread_over_workers_come_back_in_order(clip, dlib_detector, embedder):
    pipeline = FacePipeline(dlib_detector)
    one = list(stream_embeddings([clip], pipeline=pipeline, embedder=embedder, fps=4, progress=False))
    # FacePipeline() builds the default dlib pipeline in each worker (nothing big is pickled)
    split = list(
        stream_embeddings(
            [clip, clip.parent / "missing.mp4"],
            pipeline=pipeline,
            embedder=embedder,
            fps=4,
            segment_frames=2,
            workers=2,
            pipeline_factory=FacePipeline,
            progress=False,
        )
    )
    assert [t.task.segment for t in split] == [0, 1, 2, 3, 0]  # tasks past the video's end were dropped
    assert split[-1].failure is not None and "missing.mp4" in split[-1].task.path
    np.testing.assert_allclose(
        np.stack([r.embedding for t in one for r in t.rows]),
        np.stack([r.embedding for t in split for r in t.rows]),
        atol=1e-6,
    )


def test_parquet_output_is_one_table_for_pyarrow(capsys, many_photos, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "e.parquet"
    run(
        capsys,
        "embed",
        str(many_photos),
        "--weights",
        W,
        "-o",
        str(out),
        "-q",
        "--workers",
        "0",
        "--shard-rows",
        "3",
    )
    table = pq.read_table(out)  # the folder of shards reads as one table; _kprpe_embed.json is skipped
    assert table.num_rows == 8 and len(list(out.glob("part-*.parquet"))) == 3
    assert {"file", "frame", "box", "landmarks", "score", "embedding", "norm"} <= set(table.column_names)
    assert table.schema.field("embedding").type.list_size == 32


def test_without_pyarrow_a_folder_gets_npz_shards(capsys, photo_dir, tmp_path, monkeypatch):
    import kprpe.streaming.shards as embed_output

    monkeypatch.setattr(embed_output, "parquet_available", lambda: False)
    out = tmp_path / "shards"
    code, payload, _ = run(
        capsys, "embed", str(photo_dir), "--weights", W, "-o", str(out), "-q", "--workers", "0"
    )
    assert code == 0 and payload["format"] == "npz shards"
    assert [p.suffix for p in out.glob("part-*")] == [".npz"]
    assert len(read_embeddings(out)["embedding"]) == 2
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    code, _, err = run(
        capsys, "embed", str(photo_dir), "--weights", W, "-o", str(tmp_path / "x.parquet"), "-q"
    )
    assert code == 2 and "kprpe[parquet]" in err


# ----------------------------------------------------------------------------------------------- memory


def test_crops_held_at_once_are_bounded_by_the_batch_not_the_inputs(
    many_photos, dlib_detector, embedder, tmp_path
):
    """The structure that keeps memory flat: crops wait only for their batch, and yielded rows carry none."""
    pipeline = FacePipeline(dlib_detector)
    small = embedder.batch_size
    embedder.batch_size = 2
    try:
        peaks = []
        for count in (2, 8):
            stats = StreamStats()
            paths = sorted(many_photos.iterdir())[:count]
            done = list(
                stream_embeddings(paths, pipeline=pipeline, embedder=embedder, progress=False, stats=stats)
            )
            assert stats.faces == count and all(row.crop is None for task in done for row in task.rows)
            peaks.append(stats.peak_buffered_faces)
    finally:
        embedder.batch_size = small
    assert peaks[0] == peaks[1] <= 2  # one face per photo: never more than a batch waits


def test_enrol_pools_batch_by_batch_into_the_mean_template(capsys, many_photos, tmp_path):
    gallery = tmp_path / "gallery"
    for identity, names in (("a", ["p0", "p1", "p2"]), ("b", ["p3", "p4"])):
        (gallery / identity).mkdir(parents=True)
        for name in names:
            (gallery / identity / f"{name}.png").write_bytes((many_photos / f"{name}.png").read_bytes())
    code, payload, _ = run(
        capsys,
        "search",
        "enrol",
        str(gallery),
        "--weights",
        W,
        "-o",
        str(tmp_path / "i.npz"),
        "-q",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--backend",
        "numpy",
    )
    assert code == 0 and payload["identities"] == 2
    from kprpe.gallery.index import GalleryIndex

    index = GalleryIndex.load(tmp_path / "i.npz", backend="numpy")
    for identity in ("a", "b"):
        out = tmp_path / f"{identity}.npz"
        assert (
            run(
                capsys,
                "embed",
                str(gallery / identity),
                "--weights",
                W,
                "-o",
                str(out),
                "-q",
                "--workers",
                "0",
            )[0]
            == 0
        )
        mean = read_embeddings(out)["embedding"].astype(np.float64).mean(0)
        np.testing.assert_allclose(index.template(identity), mean / np.linalg.norm(mean), atol=1e-5)
        assert index.count(identity) == len(list((gallery / identity).iterdir()))
