from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from kprpe.gait import dump_array_pickle


def write_sequence(folder: Path, frames: int = 5, pose_frames: int | None = None, rng=None) -> Path:
    """A sequence folder with ``sils.pkl`` uint8 [T, 64, 44] and ``pose.pkl`` float32 [T, 17, 3] inside it."""
    rng = rng or np.random.default_rng(0)
    sils = np.zeros((frames, 64, 44), np.uint8)
    sils[:, 5:60, 12:32] = 255
    pose = np.zeros((pose_frames or frames, 17, 3), np.float32)
    pose[..., 0] = rng.uniform(12, 32, pose.shape[:2])
    pose[..., 1] = rng.uniform(5, 60, pose.shape[:2])
    pose[..., 2] = rng.uniform(0.5, 1, pose.shape[:2])
    dump_array_pickle(folder / "pose.pkl", pose)
    dump_array_pickle(folder / "sils.pkl", sils)
    return folder


@pytest.fixture
def gait_root(tmp_path) -> Path:
    """Three ids with 2-3 sequences each in the OpenGait layout."""
    root = tmp_path / "root"
    for identity, count in (("0000", 3), ("0001", 2), ("0002", 2)):
        for k in range(count):
            write_sequence(root / identity / f"cam{k}_video0" / "seq0", frames=4 + k)
    return root


class Boom:
    """Unpickling this runs ``Path.touch`` on a marker file: proof whether pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Boom(marker))
