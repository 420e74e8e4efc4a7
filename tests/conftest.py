"""Shared fixtures; threads and units of work for pytest-xdist workers (make test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "fixtures"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pytest_configure(config):
    """An xdist worker gets its share of the cores (1 thread with `make test`'s 2 workers on 2 cores): more
    threads than cores make the workers, and the processes the tests start, only wait for each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if not threads.isdigit() or int(threads) < 1:
        threads = os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // int(workers)))
    torch.set_num_threads(int(threads))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (make test), the doc runner's blocks one page at a time: tests/xdist_units.py."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist_units import make_scheduler

    return make_scheduler(config, log)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/fixtures: the official reference vectors (tiny weights usable for plumbing tests)."""
    return DATA


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    """24 identities x 8 images of 32x32 synthetic faces: folder, landmarks and the packed RecordIO."""
    from kprpe.data.pack import pack_folder
    from kprpe.data.synthetic import make_synthetic_faces

    root = tmp_path_factory.mktemp("synthetic")
    folder, landmarks = make_synthetic_faces(
        root / "images", num_identities=24, images_per_identity=8, size=32, seed=1, progress=False
    )
    pack_folder(folder, root / "train.rec", progress=False)
    return dict(folder=folder, landmarks=landmarks, rec=root / "train.rec")


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (request it from an autouse fixture in a folder's conftest)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def terminal(monkeypatch):
    """Commands print as on a terminal (the human summary; under pytest stdout is a pipe: compact JSON)."""
    monkeypatch.setattr("kprpe.cli.options.stdout_is_terminal", lambda: True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
