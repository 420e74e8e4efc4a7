"""The flip moves keypoints with the silhouettes and swaps left and right joints."""

from __future__ import annotations

import numpy as np
import pytest

from kprpe.gait.augment import COCO_FLIP_ORDER, RandomFlip, RandomPerspective, RandomRotate, flip_sequence


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


def _marked_sequence():
    """Two frames, each with a 3x3 mark (255 centre, 128 ring) under three confident joints."""
    sils = np.zeros((2, 64, 44), np.uint8)
    pose = np.zeros((2, 17, 3), np.float32)
    for t in range(2):
        for joint, (x, y) in zip((0, 9, 16), ((20 + t, 12), (14, 30 + t), (30, 52)), strict=True):
            sils[t, y - 1 : y + 2, x - 1 : x + 2] = 128
            sils[t, y, x] = 255
            pose[t, joint] = (x, y, 0.9)
    return sils, pose


def _centroid_near(frame: np.ndarray, x: float, y: float, radius: int = 4) -> tuple[float, float]:
    rows, cols = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    near = (np.abs(cols - x) <= radius) & (np.abs(rows - y) <= radius)
    weight = frame.astype(np.float64) * near
    return (weight * cols).sum() / weight.sum(), (weight * rows).sum() / weight.sum()


@pytest.mark.parametrize(
    "transform", [RandomRotate(1.0), RandomPerspective(1.0)], ids=["rotate", "perspective"]
)
def test_rotate_and_perspective_move_joints_with_their_marks(transform):
    sils, pose = _marked_sequence()
    for seed in range(5):
        out = transform({"sils": sils, "pose": pose}, np.random.default_rng(seed))
        assert not np.array_equal(out["sils"], sils)
        for t in range(2):
            for joint in (0, 9, 16):
                x, y, confidence = out["pose"][t, joint]
                cx, cy = _centroid_near(out["sils"][t], x, y)
                # bilinear resampling keeps a symmetric mark's centroid on the mapped point up to uint8
                # rounding and the map's stretch across 3 px: measured <= 0.012 px (rotate) and 0.09 px
                # (perspective) over 200 draws; 0.25 px catches a half-pixel convention slip. The marks stay
                # >= 2 px inside the frame: a mark the frame edge cuts has its centroid moved (~1 px)
                assert abs(cx - x) < 0.25 and abs(cy - y) < 0.25, (seed, t, joint, cx - x, cy - y)
                assert confidence == pytest.approx(0.9)
        assert np.all(out["pose"][:, 1] == 0)  # undetected joints stay (0, 0, 0)
    assert transform.__class__(0.0)({"sils": sils, "pose": pose}, np.random.default_rng(0))["sils"] is sils


def test_rotation_keeps_opengaits_centre_quirk():
    # OpenGait passes (h // 2, w // 2) = (32, 22) as the centre (x, y): that point is the one that stays put
    matrix = RandomRotate(1.0).matrix((64, 44), np.random.default_rng(0))
    assert np.allclose(matrix @ np.array([32.0, 22.0, 1.0]), [32.0, 22.0])
