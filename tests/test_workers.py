"""A pool worker ends when the process that started it is killed (kprpe.workers.exit_with_parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# The "run": a process with a spawn pool whose one worker sleeps in a task; it prints the worker's pid and
# waits. With watch=0 the worker does not call exit_with_parent (the control: it outlives its parent).
PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor

    def init(watch):
        if watch:
            from kprpe.workers import exit_with_parent
            exit_with_parent(poll_seconds=0.1)

    def task():
        time.sleep(60)

    if __name__ == "__main__":
        watch = sys.argv[1] == "1"
        pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=init, initargs=(watch,))
        pool.submit(task)
        while not pool._processes:
            time.sleep(0.05)
        print(next(iter(pool._processes)), flush=True)
        time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _orphan_after_parent_killed(tmp_path, watch: bool) -> tuple[int, bool]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), "1" if watch else "0"], stdout=subprocess.PIPE, text=True
    )
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # no clean-up in the parent, as with `kill -9` or the OOM killer
    parent.wait()
    # the watched worker polls every 0.1 s: it is gone well within 20 s even on a loaded machine; the
    # control's worker would be gone within 3 s if workers died with their parent anyway
    deadline = time.monotonic() + (20 if watch else 3)
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    return worker, alive


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    _, alive = _orphan_after_parent_killed(tmp_path, watch=True)
    assert not alive


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_without_the_watch_the_worker_outlives_its_parent(tmp_path):
    """The control: the test above would pass for the wrong reason if pool workers died with their parent
    anyway."""
    _, alive = _orphan_after_parent_killed(tmp_path, watch=False)
    assert alive
