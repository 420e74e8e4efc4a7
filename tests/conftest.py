"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the official reference vectors (tiny weights usable for plumbing tests)."""
    return DATA


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
