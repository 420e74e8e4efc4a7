"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "fixtures"


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
