"""Videos cost work in proportion to the frames read, and frames obey the pixel limit: a stream whose next
frame is stamped 4e7 s later is not read empty segment by empty segment, and frames larger than
``KPRPE_MAX_PIXELS`` are refused from the stream header before anything is decoded."""

from __future__ import annotations

import fractions
import itertools

import numpy as np
import pytest

from kprpe.streaming.stream import Completed, Task, iter_task_results, run_task
from kprpe.streaming.video import SegmentEnd, VideoError, sample_frames

av = pytest.importorskip("av")


class NoFaces:
    """A pipeline that finds no face (what most frames of a surveillance video look like)."""

    def faces_in_image(self, image, source=None):
        return []


def _write(path, times: list[float], size: int = 32) -> None:
    """An MJPEG video of ``size`` x ``size`` frames stamped at ``times`` seconds (millisecond time base)."""
    base = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuvj420p"
        stream.time_base = base
        for i, seconds in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(seconds * 1000), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def gap_video(tmp_path):
    path = tmp_path / "gap.mkv"
    _write(path, [0.0, 4e7, 4e7 + 1])  # three frames; the second 40 million seconds after the first
    return path


def test_a_time_gap_is_stepped_over(gap_video):
    # two tasks; before, 2.5 million empty segments (taken here: the first 50)
    results = list(itertools.islice(iter_task_results([gap_video], pipeline=NoFaces(), fps=1), 50))
    assert [r.task.segment for r in results] == [0, 2_500_000]
    assert sum(r.frames for r in results) == 3 and results[-1].end

    status = SegmentEnd()
    assert [f.time for f in sample_frames(gap_video, fps=1, segment=0, status=status)] == [0.0]
    assert not status.end and status.next_segment == int(4e7) // 16  # bins of 1 s, 16 to a segment


def test_a_resumed_run_knows_the_gap_was_read(gap_video):
    completed = Completed()
    for result in iter_task_results([gap_video], pipeline=NoFaces(), fps=1):
        completed.add(result.task.key, result.task.segment, 0, result.end, result.frames, result.next_segment)
    assert completed.file_done(gap_video)
    assert list(iter_task_results([gap_video], pipeline=NoFaces(), fps=1, completed=completed)) == []
    # one segment missing: the file is not done, and only that segment is read again
    completed.segments[next(iter(completed.segments))].discard(2_500_000)
    assert not completed.file_done(gap_video)
    again = list(iter_task_results([gap_video], pipeline=NoFaces(), fps=1, completed=completed))
    assert [r.task.segment for r in again] == [2_500_000]


def test_video_frames_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.mkv"
    _write(path, [0.0, 0.04], size=64)
    monkeypatch.setenv("KPRPE_MAX_PIXELS", str(64 * 64 - 1))
    status = SegmentEnd()
    with pytest.raises(VideoError, match="64x64 .* larger than the limit"):
        list(sample_frames(path, fps=25, status=status))
    assert status.decoded == 0
    result = run_task(Task(str(path), "big", 0), NoFaces(), fps=25)
    assert "larger than the limit" in result.failure and result.frames == 0
    monkeypatch.setenv("KPRPE_MAX_PIXELS", str(64 * 64))
    assert len(list(sample_frames(path, fps=25))) == 2
