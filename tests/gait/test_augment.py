"""The flip moves keypoints with the silhouettes and swaps left and right joints."""

from __future__ import annotations

import numpy as np
import pytest

from kprpe.gait.augment import COCO_FLIP_ORDER, RandomFlip, flip_sequence


def test_flip_order_swaps_left_and_right_pairs():
    assert COCO_FLIP_ORDER[0] == 0
    assert sorted(COCO_FLIP_ORDER) == list(range(17))
    assert all(COCO_FLIP_ORDER[COCO_FLIP_ORDER[i]] == i for i in range(17))  # an involution
    assert COCO_FLIP_ORDER[13] == 14 and COCO_FLIP_ORDER[5] == 6  # left knee <-> right knee, shoulders


def test_joints_stay_on_their_pixels_and_swap_sides():
    sils = np.zeros((2, 64, 44), np.uint8)
    pose = np.zeros((2, 17, 3), np.float32)
    pose[:, 13] = (5, 40, 0.9)  # left knee at column 5
    pose[:, 14] = (30, 41, 0.8)  # right knee at column 30
    sils[:, 40, 5] = 255
    sils[:, 41, 30] = 255
    flipped, moved = flip_sequence(sils, pose)
    # the left knee's mark is now at column 44 - 1 - 5 = 38, drawn by the flipped *right* knee joint
    assert flipped[0, 40, 38] == 255 and moved[0, 14, 0] == 38 and moved[0, 14, 2] == pytest.approx(0.9)
    assert flipped[0, 41, 13] == 255 and moved[0, 13, 0] == 13 and moved[0, 13, 1] == 41
    for t in range(2):  # every confident joint lands on its mark
        for joint in (13, 14):
            x, y, _ = moved[t, joint]
            assert flipped[t, int(y), int(x)] == 255
    assert np.all(moved[:, 0] == 0)  # undetected joints stay (0, 0, 0)
    back, restored = flip_sequence(flipped, moved)
    assert np.array_equal(back, sils) and np.array_equal(restored, pose)


def test_random_flip_draws_once_per_sequence():
    item = {"sils": np.arange(2 * 64 * 44).reshape(2, 64, 44), "pose": np.ones((2, 17, 3), np.float32)}
    assert RandomFlip(0.0)(item, np.random.default_rng(0)) is item
    out = RandomFlip(1.0)(item, np.random.default_rng(0))
    assert np.array_equal(out["sils"], item["sils"][..., ::-1])
    assert np.all(out["pose"][..., 0] == 42)
    with pytest.raises(ValueError, match="probability"):
        RandomFlip(1.5)
