"""``kprpe embed --ray`` on a local Ray with 2 workers gives the local run's output: the same shards,
manifests, rows and failures, the embeddings to float32 rounding; a local output is continued on Ray
(kprpe.streaming.ray_data).

One Ray for the module (starting it takes ~20 s on the loaded 2-core machine); the CLI uses the Ray it
finds started in its process."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from float_tolerance import F32_EPS
from kprpe.cli import main
from kprpe.face import FaceEmbedder, FacePipeline
from kprpe.keypoints import flip_keypoints
from kprpe.streaming.shards import HEADER, read_embeddings
from kprpe.streaming.stream import expand_media_paths
from kprpe.streaming.video import sample_frames

from .conftest import TINY_WEIGHTS, run_cli

pytest.importorskip("dlib")
pytest.importorskip("ray.data")
W = str(TINY_WEIGHTS)
FPS = "4"
EXACT = ("file", "name", "frame", "time", "face_index", "box", "landmarks", "keypoints", "score")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs, started the way ``--ray`` with no address starts one."""
    from kprpe.streaming.ray_data import ray_session

    with ray_session(None, workers=2) as ray:
        assert ray.cluster_resources()["CPU"] == 2
        yield ray


@pytest.fixture(scope="module")
def inputs(many_photos, clip, tmp_path_factory):
    """Photos, a video, and two that fail (an unreadable photo, a video that is not one)."""
    bad = tmp_path_factory.mktemp("bad")
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    (bad / "broken.mp4").write_bytes(b"not a video")
    return [str(many_photos), str(clip), str(bad / "broken.jpg"), str(bad / "broken.mp4")]


@pytest.fixture(scope="module")
def local_output(inputs, tmp_path_factory):
    """The same job without Ray: what the Ray runs must give."""
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    argv = ["embed", *inputs, "--weights", W, "-o", str(out), "-q", "--fps", FPS, "--batch-size", "3"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--shard-rows", "5", "--workers", "0"]) == 1  # two inputs fail
    return out, json.loads(printed.getvalue())


def _embed(capsys, inputs, out, *extra):
    argv = ["embed", *inputs, "--weights", W, "-o", str(out), "-q", "--fps", FPS, "--batch-size", "3"]
    return run_cli(capsys, *argv, "--shard-rows", "5", *extra)


def _manifests(folder) -> list[dict]:
    import pyarrow.parquet as pq

    return [json.loads(pq.read_schema(s).metadata[b"kprpe"]) for s in sorted(folder.glob("part-*.parquet"))]


def _manifest_lists(folder, key: str) -> list:
    return [entry for manifest in _manifests(folder) for entry in manifest[key]]


def _float64_embeddings(rows: dict, inputs) -> tuple[np.ndarray, np.ndarray]:
    """The model's unit embeddings and norms, in float64, of the crops the pipeline makes of the rows'
    faces (remade here: detection and alignment are exact, see the test)."""
    pipeline = FacePipeline()
    embedder = FaceEmbedder.from_weights(TINY_WEIGHTS)
    model = embedder.model.double()
    crops = {}
    for source in inputs:
        for path in expand_media_paths([source]):
            if path.suffix == ".mp4" and "broken" not in path.name:
                for frame in sample_frames(path, fps=float(FPS)):
                    for face in pipeline.faces_in_image(frame.image):
                        crops[f"{path}@{frame.number}"] = face
            elif "broken" not in path.name:
                (face,) = pipeline.faces_in_file(path)
                crops[str(path)] = face
    faces = [crops[name] for name in rows["name"].tolist()]
    keypoints = np.stack([f.keypoints for f in faces]).astype(np.float32)  # what the model reads
    np.testing.assert_array_equal(keypoints, rows["keypoints"])  # the same faces, aligned the same
    images = torch.from_numpy(np.stack([f.image for f in faces])).permute(0, 3, 1, 2).double() / 255
    images = (images - 0.5) / 0.5
    keypoints = torch.from_numpy(keypoints).double()
    with torch.no_grad():
        raw = model(images, keypoints) + model(
            torch.flip(images, dims=[-1]), flip_keypoints(keypoints, images.shape[-1])
        )
    norms = raw.norm(dim=1)
    return (raw / norms[:, None]).numpy(), norms.numpy()


@pytest.mark.slow  # ~1 min: Ray, two actors that each load torch, dlib and the model
def test_ray_gives_the_local_runs_output(capsys, local_ray, inputs, local_output, tmp_path):
    (local, want), on_ray = local_output, tmp_path / "ray.parquet"
    code, got, err = _embed(capsys, inputs, on_ray, "--ray", "--ray-workers", "2")
    assert code == 1 and "Traceback" not in err
    assert want["embedded"] == 16  # 8 photos + 8 frames (2 s at 4 fps)
    for key in ("embedded", "rows", "files", "frames", "failures"):
        assert got[key] == want[key], key
    # model batches: the local run cuts all 16 faces into 3s; each actor call cuts the faces of its own
    # units (per call: min(--batch-size, units / workers) of them, in input order); each file is one unit
    # here, the clip's 8 sampled frames being less than a segment
    files = [str(path) for path in expand_media_paths(inputs)]
    faces = collections.Counter(read_embeddings(local)["file"].tolist())
    per_call = min(3, math.ceil(len(files) / 2))
    calls = [files[start : start + per_call] for start in range(0, len(files), per_call)]
    assert want["batches"] == math.ceil(16 / 3)
    assert got["batches"] == sum(math.ceil(sum(faces[f] for f in call) / 3) for call in calls)
    assert {f["file"] for f in got["failures"]} == {inputs[2], inputs[3]}
    assert f"skipped {inputs[2]}" in err  # reported as they happen, as a local run reports them
    # the same kind of shards, saying the same tasks are done (what resume and readers go by); where a run
    # cuts them can differ: a shard is also committed every SHARD_SECONDS, and Ray's start takes seconds
    shards = sorted(p.name for p in on_ray.glob("part-*"))
    assert shards == [f"part-{i:06d}.parquet" for i in range(len(shards))]
    for key in ("tasks", "failures"):
        assert _manifest_lists(on_ray, key) == _manifest_lists(local, key)
    assert all(m["settings"] == _manifests(local)[0]["settings"] for m in _manifests(on_ray))
    header = json.loads((on_ray / HEADER).read_text())
    assert header["settings"] == json.loads((local / HEADER).read_text())["settings"]
    a, b = read_embeddings(local), read_embeddings(on_ray)
    for column in EXACT:  # detection and alignment do not depend on batching: bit for bit
        np.testing.assert_array_equal(b[column], a[column], err_msg=column)
    # The embeddings depend on batching: an actor batches the faces of its own files (and the tensor
    # kernels split a matrix product's sums differently for another batch size), so float32 rounds
    # differently. Bound: 4x the float32 error the local run itself has against the float64 model (what
    # float32 costs this computation on this CPU), floored at 16 ulps of 1 (unit vectors; norms: of their
    # scale). A wrong crop, keypoint or model is off by O(1e-2) or more.
    unit64, norm64 = _float64_embeddings(a, inputs)
    for column, ref64 in (("embedding", unit64), ("norm", norm64)):
        scale = np.abs(ref64).max()
        own = np.abs(a[column] - ref64).max()
        allowed = 4 * max(own, 16 * F32_EPS * scale)
        assert np.abs(b[column] - ref64).max() <= allowed, column
        assert np.abs(b[column] - a[column]).max() <= allowed, column


@pytest.mark.slow
def test_an_interrupted_local_run_is_finished_on_ray(
    capsys, local_ray, inputs, local_output, tmp_path, monkeypatch
):
    """Restart: the shards of an interrupted run are kept and the run continued with --ray skips exactly
    the files they hold."""
    (whole, _), cut = local_output, tmp_path / "cut.parquet"
    calls = {"n": 0}
    real = FaceEmbedder.embed_crops

    def dies_on_fourth_batch(self, crops, keypoints):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C (or a killed process) in the middle of the video
        return real(self, crops, keypoints)

    monkeypatch.setattr(FaceEmbedder, "embed_crops", dies_on_fourth_batch)
    argv = ["embed", *inputs, "--weights", W, "-o", str(cut), "-q", "--fps", FPS, "--batch-size", "3"]
    assert main([*argv, "--shard-rows", "5", "--workers", "0"]) == 130
    monkeypatch.setattr(FaceEmbedder, "embed_crops", real)
    kept = read_embeddings(cut)["name"].tolist()
    assert 0 < len(kept) < 16
    code, payload, _ = _embed(capsys, inputs, cut, "--ray", "--ray-workers", "2")
    assert code == 1 and payload["resumed"] is True and payload["embedded"] == 16 - len(kept)
    a, b = read_embeddings(whole), read_embeddings(cut)
    assert b["name"].tolist() == a["name"].tolist()  # nothing missing, nothing twice, in input order
    np.testing.assert_array_equal(b["landmarks"], a["landmarks"])
    assert payload["failures"] == [{"file": f, "reason": r} for f, r in a["failures"]]


@pytest.mark.slow
def test_an_actor_that_cannot_load_the_model_is_one_line(capsys, local_ray, many_photos, tmp_path):
    from kprpe.streaming.ray_data import RayRunner
    from kprpe.streaming.shards import embed_to_output
    from kprpe.streaming.stream import WorkerStartError

    def no_model():
        raise FileNotFoundError("weights.safetensors is not on this node")

    runner = RayRunner(pipeline_factory=FacePipeline, embedder_factory=no_model, workers=2)
    expected = "a Ray worker could not start: FileNotFoundError: weights"
    with pytest.raises(WorkerStartError, match=expected) as caught:
        embed_to_output(
            [many_photos],
            tmp_path / "out.parquet",
            pipeline=FacePipeline(),
            embedder=FaceEmbedder.from_weights(TINY_WEIGHTS),
            runner=runner,
            progress=False,
        )
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.parquet").exists()  # nothing committed: nothing left behind


@pytest.mark.slow
def test_gpus_on_a_cluster_without_any_are_refused(capsys, local_ray, many_photos, tmp_path):
    """Ray would keep actors that ask for a GPU pending forever on this GPU-less Ray: one line instead."""
    assert "GPU" not in local_ray.cluster_resources()
    out = tmp_path / "o.parquet"
    argv = ["embed", many_photos, "--weights", W, "-o", out, "--ray", "--ray-gpus", "1"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert "--ray-gpus 1 asks a GPU for each actor, but the Ray cluster has none" in err
    assert not out.exists()


@pytest.mark.slow
def test_a_video_split_across_actors_gives_the_local_rows(local_ray, clip):
    """The clip in segments of 2 sampled frames (4 units) on 2 actors: the local path's tasks and rows."""
    import functools

    from kprpe.streaming.ray_data import RayRunner, plan_units
    from kprpe.streaming.stream import Completed, stream_embeddings

    def run(runner=None):
        embedder = FaceEmbedder.from_weights(TINY_WEIGHTS, batch_size=1)  # each face alone, either way
        done = stream_embeddings(
            [clip], pipeline=FacePipeline(), embedder=embedder, fps=4.0, segment_frames=2, runner=runner
        )
        return list(done)

    factory = functools.partial(FaceEmbedder.from_weights, TINY_WEIGHTS, batch_size=1)
    runner = RayRunner(FacePipeline, factory, workers=2, batch_size=1, fps=4.0, segment_frames=2)
    assert [unit[1:] for unit in plan_units([clip], Completed(), fps=4.0, segment_frames=2)] == [
        (0, False), (1, False), (2, False), (3, True)  # one unit a call: 4 calls over the 2 actors
    ]
    local, split = run(), run(runner)
    summary = [[(d.task, d.end, d.frames, d.failure, len(d.rows)) for d in done] for done in (local, split)]
    assert summary[1] == summary[0] and len(summary[0]) == 4
    rows = [[row for d in done for row in d.rows] for done in (local, split)]
    assert len(rows[0]) == 8
    for mine, theirs in zip(rows[1], rows[0], strict=True):
        for name in ("name", "frame", "time", "score"):
            assert getattr(mine, name) == getattr(theirs, name), name
        np.testing.assert_array_equal(mine.landmarks, theirs.landmarks)
        np.testing.assert_array_equal(mine.keypoints, theirs.keypoints)
        # the same crop through the same model, in another process's threads: float32 rounding at most
        # (another frame's or crop's embedding differs by more than 1e-2)
        np.testing.assert_allclose(mine.embedding, theirs.embedding, rtol=0, atol=1e-5)
