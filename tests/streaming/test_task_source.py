"""kprpe.streaming.stream.TaskSource: which tasks come next, and which of the tasks worker processes ran ahead
the in-process path never runs (its end-to-end counterpart: tests/face/test_embed_workers.py)."""

from __future__ import annotations

from pathlib import Path

from kprpe.streaming.stream import Completed, Task, TaskResult, TaskSource, file_key


def test_tasks_run_ahead_into_a_gap_or_past_the_end_are_stepped_over():
    source = TaskSource([Path("v.mp4"), Path("a.jpg")], Completed())
    key = file_key("v.mp4")
    ahead = [source.next() for _ in range(3)]  # in flight before any result is known, as with workers
    assert [task.segment for task in ahead] == [0, 1, 2]
    source.record(TaskResult(ahead[0], end=False, frames=16, next_segment=4))  # segments 1-3 hold no frame
    assert not source.stepped_over(ahead[0])
    assert source.stepped_over(ahead[1]) and source.stepped_over(ahead[2])
    assert source.next() == Task("v.mp4", key, 4)  # not 3: the gap is not asked for any further
    source.record(TaskResult(Task("v.mp4", key, 4), end=False, frames=16, next_segment=5))
    assert not source.stepped_over(Task("v.mp4", key, 5))
    source.record(TaskResult(Task("v.mp4", key, 5), end=True, frames=3))
    assert source.stepped_over(Task("v.mp4", key, 6))  # past the end
    assert not source.stepped_over(Task("a.jpg", file_key("a.jpg")))  # a photo always counts
