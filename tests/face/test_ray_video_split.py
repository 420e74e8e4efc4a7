"""Under ``--ray`` a video is split into its segments, each a unit of work any actor may take
(kprpe.streaming.ray_data.plan_units); the driver keeps exactly the tasks the local path would have, in its
order. Run here without Ray: a stand-in for Ray Data runs the actors in this process, pickling what Ray
would pickle, so the split and its reassembly are checked in seconds (a real Ray run: test_embed_ray.py)."""

from __future__ import annotations

import contextlib
import functools
import pickle

import numpy as np
import pytest

from kprpe.face import FaceEmbedder, FacePipeline
from kprpe.streaming import ray_data
from kprpe.streaming.stream import STILL, Completed, file_key, stream_embeddings

from .conftest import TINY_WEIGHTS

av = pytest.importorskip("av")
pytest.importorskip("dlib")
FPS, SEGMENT = 4.0, 2  # a segment: 2 sampled frames, half a second


class _InProcessRay:
    """What RayRunner asks of Ray: the units go, ``batch_size`` at a time and in order, to two actors
    taking turns; the calls (the units each was given) are recorded."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int, bool]]] = []
        fake = self

        class Dataset:
            def __init__(self, items) -> None:
                self.items = items

            def map_batches(self, actor, *, fn_constructor_kwargs, batch_size, **_):
                self.actor, self.kwargs, self.size = actor, fn_constructor_kwargs, batch_size
                return self

            def iter_batches(self, **_):
                actors = [self.actor(**pickle.loads(pickle.dumps(self.kwargs))) for _ in range(2)]
                for start in range(0, len(self.items), self.size):
                    items = self.items[start : start + self.size]
                    fake.calls.append([(i["path"], i.get("segment"), i.get("read_on")) for i in items])
                    batch = {key: np.asarray([item[key] for item in items]) for key in items[0]}
                    yield pickle.loads(pickle.dumps(actors[len(fake.calls) % 2](batch)))

        class Data:
            DataContext = type("DataContext", (), {"get_current": staticmethod(lambda: _Context())})
            from_items = staticmethod(lambda items, **_: Dataset(items))
            ActorPoolStrategy = staticmethod(lambda size: size)

        self.data = Data()

    def cluster_resources(self) -> dict:
        return {"CPU": 2}


class _Context:
    def __init__(self) -> None:
        self.execution_options = type("Options", (), {})()


def _tasks(done) -> list[tuple]:
    return [(d.task, d.end, d.frames, d.failure, d.next_segment, len(d.rows)) for d in done]


def _rows(done) -> list:
    return [row for d in done for row in d.rows]


def _embed(inputs, runner=None, completed=None):
    embedder = FaceEmbedder.from_weights(TINY_WEIGHTS, batch_size=1)  # one face a call: bit for bit
    done = stream_embeddings(
        inputs,
        pipeline=FacePipeline(),
        embedder=embedder,
        fps=FPS,
        segment_frames=SEGMENT,
        workers=0,
        completed=completed,
        progress=False,
        runner=runner,
    )
    return list(done)


def _runner(monkeypatch):
    fake = _InProcessRay()
    monkeypatch.setattr(ray_data, "ray_session", lambda *a, **k: contextlib.nullcontext(fake))
    monkeypatch.setattr(ray_data, "single_threaded", lambda: None)  # the actors live in this process
    embedder = functools.partial(FaceEmbedder.from_weights, TINY_WEIGHTS, batch_size=1)
    runner = ray_data.RayRunner(
        FacePipeline, embedder, batch_size=3, fps=FPS, segment_frames=SEGMENT
    )
    return runner, fake


def test_units_are_the_segments_the_header_implies(clip, gap_clip, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    plan = functools.partial(ray_data.plan_units, fps=FPS, segment_frames=SEGMENT)
    c, b = str(clip), str(broken)
    # clip: 2 s at 4 fps = 8 bins = 4 segments, the last read on to the real end
    assert plan([clip], Completed()) == [(c, 0, False), (c, 1, False), (c, 2, False), (c, 3, True)]
    assert len(plan([gap_clip], Completed())) == 14  # the header says 7 s (to the last frame's end): 28 bins
    assert plan([broken, "a.jpg"], Completed()) == [(b, 0, True), ("a.jpg", STILL, False)]
    done = Completed()
    done.add(file_key(clip), 1, 2, False, 2)
    assert plan([clip], done) == [(c, 0, False), (c, 2, False), (c, 3, True)]


def test_split_videos_give_the_local_runs_tasks_and_rows(monkeypatch, clip, gap_clip, many_photos, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    inputs = [many_photos / "p0.png", clip, gap_clip, broken, many_photos / "p1.png"]
    local = _embed(inputs)
    runner, fake = _runner(monkeypatch)
    split = _embed(inputs, runner)
    # segments 2-11 of the gap clip hold no frame: the local path steps over them, so must the split run
    assert [d.task.segment for d in local if d.task.path == str(gap_clip)] == [0, 1, 12, 13]
    assert _tasks(split) == _tasks(local)
    assert len(_rows(local)) == 2 + 8 + 8
    for mine, theirs in zip(_rows(split), _rows(local), strict=True):
        for name in ("file", "name", "frame", "time", "face_index", "score", "norm"):
            assert getattr(mine, name) == getattr(theirs, name), name
        for name in ("box", "landmarks", "keypoints", "embedding"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=name)
    # the clip's segments went to different calls (actors), not one actor for the whole video
    clip_calls = [call for call in fake.calls if any(path == str(clip) for path, _, _ in call)]
    assert len(clip_calls) >= 2


def test_a_resumed_split_video_reads_only_the_missing_segments(monkeypatch, clip):
    whole = _embed([clip])
    completed = Completed()
    for d in whole:
        if d.task.segment != 2:  # segment 2 was lost (an interrupted run)
            completed.add(d.task.key, d.task.segment, len(d.rows), d.end, d.frames, d.next_segment)
    runner, _ = _runner(monkeypatch)
    again = _embed([clip], runner, completed=completed)
    assert _tasks(again) == [t for t in _tasks(whole) if t[0].segment == 2]
    assert [r.name for r in _rows(again)] == [r.name for d in whole if d.task.segment == 2 for r in d.rows]
