from __future__ import annotations

import copy

import pytest

TINY = {
    "model": {"name": "vit_tiny_kprpe", "overrides": {"img_size": 32, "patch_size": 4}},
    "data": {"batch_size": 16, "num_workers": 0},
    "head": {"type": "adaface", "scale": 16},
    "optim": {"lr": 2e-3},
    "schedule": {"warmup_steps": 2},
    "train": {"max_steps": 6, "log_every": 2, "checkpoint_every": 0, "progress": False, "tensorboard": False},
}


@pytest.fixture
def tiny_config(synthetic_data, tmp_path):
    """A config dict for a few-second CPU run (deep copy: tests may edit it)."""
    cfg = copy.deepcopy(TINY)
    cfg["data"]["train"] = str(synthetic_data["rec"])
    cfg["data"]["landmarks"] = str(synthetic_data["landmarks"])
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    return cfg


@pytest.fixture(autouse=True)
def _few_threads(one_torch_thread):
    """Training tests run on one thread (the machine is shared)."""
