from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kprpe.data.pack import pack_folder
from kprpe.data.synthetic import make_synthetic_faces


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    """24 identities x 8 images of 32x32 synthetic faces: folder, landmarks and the packed RecordIO."""
    root = tmp_path_factory.mktemp("synthetic")
    folder, landmarks = make_synthetic_faces(root / "images", num_identities=24, images_per_identity=8, size=32, seed=1, progress=False)
    pack_folder(folder, root / "train.rec", progress=False)
    return dict(folder=folder, landmarks=landmarks, rec=root / "train.rec")


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
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
