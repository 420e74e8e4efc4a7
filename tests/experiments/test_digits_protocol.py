"""Protocol pieces of the digits experiment: keypoints follow the image, the split, the canvas bounds."""

from __future__ import annotations

import numpy as np
import pytest

from kprpe.experiments.digits_data import (
    AFFNIST_MIX,
    SWEEPS,
    TRAIN_AUGMENTATION,
    affine_about,
    build_test_sets,
    digit_box_keypoints,
    keypoint_marks,
    load_canvas_digits,
    sample_affines,
    split_indices,
    sweep_affines,
    transform_keypoints,
    warp_images,
)


@pytest.fixture(scope="module")
def digits():
    return load_canvas_digits(canvas=32, digit=16)


def test_canvas_digits_shapes_and_centring(digits):
    assert digits.images.shape == (1797, 32, 32)
    assert digits.images.dtype == np.float32
    assert 0.0 <= digits.images.min() and digits.images.max() <= 1.0
    assert set(np.unique(digits.labels)) == set(range(10))
    # nothing outside the 16x16 paste frame at offset 8
    frame = np.zeros((32, 32), bool)
    frame[8:24, 8:24] = True
    assert digits.images[:, ~frame].max() == 0.0
    kp = digits.keypoints
    assert kp.shape == (1797, 5, 2)
    assert (kp[:, :4] >= 8).all() and (kp[:, :4] <= 23).all()
    np.testing.assert_allclose(kp[:, 4], kp[:, :4].mean(axis=1), atol=1e-5)  # centre of the box


def test_box_keypoints_on_synthetic_ink():
    img = np.zeros((20, 20), np.float32)
    img[5:9, 3:12] = 1.0  # rows 5..8, cols 3..11
    kp = digit_box_keypoints(img)
    np.testing.assert_allclose(kp, [[3, 5], [11, 5], [11, 8], [3, 8], [7, 6.5]])
    with pytest.raises(ValueError, match="no ink"):
        digit_box_keypoints(np.zeros((8, 8), np.float32))


def test_split_is_seeded_disjoint_and_complete(digits):
    tr1, te1 = split_indices(digits.labels, 0.22, seed=0)
    tr2, te2 = split_indices(digits.labels, 0.22, seed=0)
    tr3, _ = split_indices(digits.labels, 0.22, seed=1)
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(te1, te2)
    assert not np.array_equal(tr1, tr3)
    assert len(np.intersect1d(tr1, te1)) == 0
    assert len(tr1) + len(te1) == len(digits.labels)
    # stratified: every class in the test set in about the same proportion
    frac = np.bincount(digits.labels[te1], minlength=10) / np.bincount(digits.labels, minlength=10)
    assert np.all(np.abs(frac - 0.22) < 0.02)
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(digits.labels, 1.5)


def _ink_box(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    ys, xs = np.nonzero(image > threshold)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)


def test_keypoints_follow_the_image_affine():
    """A bright square's corners, warped with the image, land where the keypoints are mapped."""
    size = 48
    img = np.zeros((1, size, size), np.float32)
    img[0, 18:30, 16:32] = 1.0  # x 16..31, y 18..29
    kp = digit_box_keypoints(img[0])[None]
    centre = ((size - 1) / 2, (size - 1) / 2)
    for m in [
        affine_about(centre, rotation_deg=30.0),
        affine_about(centre, scale_x=1.3, scale_y=0.8, shear=0.3, shift=(4.0, -3.0)),
        affine_about(centre, rotation_deg=-45.0, scale_x=0.9, scale_y=0.9),
    ]:
        warped = warp_images(img, m[None])[0]
        moved = transform_keypoints(kp, m[None])[0]
        for corner in moved[:4]:
            # the warped image is bright right at each mapped corner (nearest pixel) ...
            x, y = np.round(corner).astype(int)
            assert warped[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() > 0.5
        # ... the mapped centre is the centre of the warped ink, and the corners span its box
        ys, xs = np.nonzero(warped > 0.5)
        np.testing.assert_allclose(moved[4], [xs.mean(), ys.mean()], atol=0.6)
        lo, hi = moved[:4].min(0), moved[:4].max(0)
        box = _ink_box(warped)
        np.testing.assert_allclose(box, [lo[0], lo[1], hi[0], hi[1]], atol=1.01)


def test_pure_translation_moves_keypoints_exactly():
    m = affine_about((15.5, 15.5), shift=(3.0, -2.0))
    kp = np.array([[[10.0, 10.0], [20.0, 12.0]]])
    np.testing.assert_allclose(transform_keypoints(kp, m[None]), kp + [3.0, -2.0])


@pytest.mark.parametrize("spec", [AFFNIST_MIX, TRAIN_AUGMENTATION])
def test_sampled_transforms_keep_the_digit_inside(digits, spec):
    rng = np.random.default_rng(0)
    kp = digits.keypoints[:300].astype(np.float64)
    mats = sample_affines(kp, 32, spec, rng)
    corners = transform_keypoints(kp[:, :4], mats)
    assert corners.min() >= -1e-6 and corners.max() <= 31 + 1e-6
    # and no ink is cut off: the warped ink mass is the original's times the area factor
    warped = warp_images(digits.images[:300], mats)
    expected = digits.images[:300].sum(axis=(1, 2)) * np.abs(np.linalg.det(mats[:, :, :2]))
    np.testing.assert_allclose(warped.sum(axis=(1, 2)), expected, rtol=0.04)
    if spec.shift is not None:
        centre_shift = np.abs(transform_keypoints(np.array([[[15.5, 15.5]]]), mats)[:, 0] - 15.5)
        assert centre_shift.max() <= spec.shift * 32 + 1e-6


def test_sweeps_apply_the_requested_strength(digits):
    rng = np.random.default_rng(0)
    kp = digits.keypoints[:50].astype(np.float64)
    for factor, levels in SWEEPS.items():
        for level in levels:
            mats = sweep_affines(kp, 32, factor, level, rng)
            corners = transform_keypoints(kp[:, :4], mats)
            if factor != "scale":  # enlarging may push a wide digit to the edge; the others must stay inside
                assert corners.min() >= -1e-6 and corners.max() <= 31 + 1e-6, factor
            if factor == "rotation":
                angles = np.degrees(np.arctan2(-mats[:, 1, 0], mats[:, 0, 0]))
                np.testing.assert_allclose(np.abs(angles), level)
            elif factor == "scale":
                np.testing.assert_allclose(np.linalg.det(mats[:, :, :2]), level**2)
    with pytest.raises(ValueError, match="unknown sweep factor"):
        sweep_affines(kp, 32, "warp", 1.0, rng)


def test_test_sets_are_fixed_by_their_seed(digits):
    idx = np.arange(0, 1797, 60)
    a = build_test_sets(digits, idx, seed=5, draws=2, affnist_draws=3)
    b = build_test_sets(digits, idx, seed=5, draws=2, affnist_draws=3)
    names = [t.name for t in a]
    assert names[:2] == ["clean", "affnist"] and len(names) == 2 + sum(len(v) for v in SWEEPS.values())
    for ta, tb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta.images, tb.images)
        np.testing.assert_array_equal(ta.keypoints, tb.keypoints)
    assert len(a[1].labels) == 3 * len(idx) and len(a[2].labels) == 2 * len(idx)


def test_keypoint_marks_peak_at_keypoints():
    kp = np.array([[[5.0, 7.0], [20.0, 3.0], [10.0, 10.0], [0.0, 0.0], [31.0, 31.0]]], np.float32)
    marks = keypoint_marks(kp, 32)
    assert marks.shape == (1, 32, 32)
    for x, y in kp[0].astype(int):
        assert marks[0, y, x] == pytest.approx(1.0)
    assert marks[0, 20, 25] < 1e-3


def test_keypoint_definition_does_not_change_the_test_images(digits):
    frame = load_canvas_digits(canvas=32, digit=16, box="frame")
    np.testing.assert_allclose(frame.keypoints[:, 0], 8.0)  # top-left of the paste frame for every digit
    np.testing.assert_allclose(frame.keypoints[:, 2], 23.0)
    np.testing.assert_array_equal(frame.ink_boxes, digits.keypoints)
    idx = np.arange(0, 1797, 90)
    ink_sets = build_test_sets(digits, idx, seed=3)
    frame_sets = build_test_sets(frame, idx, seed=3)
    for a, b in zip(ink_sets, frame_sets, strict=True):
        np.testing.assert_array_equal(a.images, b.images)  # same test images ...
        assert not np.allclose(a.keypoints, b.keypoints)  # ... different keypoints given to the models
