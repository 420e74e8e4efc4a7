from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _few_threads(one_torch_thread):
    """Data tests run on one thread (the machine is shared)."""
