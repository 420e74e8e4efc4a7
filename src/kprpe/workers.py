"""Worker processes that do not outlive the run that started them.

A ``ProcessPoolExecutor`` worker whose parent is killed (``kill PID``, an out-of-memory kill, a closed
terminal that only signals the parent) keeps running its task: a digits training would go on for minutes,
using the cores and writing into the output folder of a run the user thinks has stopped.
:func:`exit_with_parent`, called in a worker's initializer, ends the worker as soon as its parent is gone.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]

POLL_SECONDS = 1.0


def exit_with_parent(poll_seconds: float = POLL_SECONDS) -> None:
    """Start a daemon thread that ends this process (exit status 1) once its parent process has gone.

    The parent is watched by its process id: an orphan is re-parented (to init or a subreaper), so
    ``os.getppid()`` changes. Polling is the portable way (``prctl(PR_SET_PDEATHSIG)`` is Linux-only). The
    pid is the one multiprocessing started the worker from, so a parent that died while the worker was
    still starting is noticed too."""
    import multiprocessing

    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None else os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)  # nothing to clean up: the task's writes are atomic, a partial one is dropped

    threading.Thread(target=watch, name="kprpe-exit-with-parent", daemon=True).start()
