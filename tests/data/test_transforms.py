"""Keypoints must land on the same image content after every augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kprpe.data.transforms import AugmentConfig, FaceAugment
from kprpe.keypoints import ARCFACE_TEMPLATE_112, FACE_FLIP_PERMUTATION, flip_keypoints

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], dtype=np.uint8)


def _marked_image(size=112, jitter=None):
    """Grey image with a distinct colour blob centred on each keypoint; returns (image, normalised
    keypoints)."""
    img = np.full((size, size, 3), 128, dtype=np.uint8)
    kp_px = ARCFACE_TEMPLATE_112 / 112 * size + (jitter if jitter is not None else 0)
    for k, (x, y) in enumerate(kp_px):
        cv2.circle(
            img, (int(round(x)), int(round(y))), max(3, size // 20), tuple(int(c) for c in COLOURS[k]), -1
        )
    return img, kp_px / size


def _colour_at(img, kp):
    h, w = img.shape[:2]
    x, y = kp[0] * w, kp[1] * h
    return img[int(round(y)), int(round(x))].astype(int)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out_size=st.sampled_from([32, 64, 112]),
    in_size=st.sampled_from([96, 112, 150]),
)
def test_geometry_keeps_keypoints_on_content(seed, out_size, in_size):
    img, kp = _marked_image(in_size)
    aug = FaceAugment(
        AugmentConfig(
            flip_p=0.5, rotation_p=1.0, rotation_deg=20, scale_min=0.8, scale_max=1.2, translate=0.1
        ),
        out_size,
    )
    out, kp_out = aug(img, kp, np.random.default_rng(seed))
    assert out.shape == (out_size, out_size, 3) and kp_out.shape == (5, 2)
    # after a flip, keypoint k is the point that was FACE_FLIP_PERMUTATION[k]: left/right names follow the
    # image
    flipped = kp_out[0, 0] > kp_out[1, 0]
    assert not flipped, "keypoint 0 must stay the image-left eye after any flip"
    for k in range(5):
        col, row = (int(round(v)) for v in kp_out[k] * out_size)
        if not (0 <= col < out_size and 0 <= row < out_size):
            continue  # scale + shift can push a point (and its blob) off the canvas; nothing to look at
        got = _colour_at(out, kp_out[k])
        # the blob at keypoint k is one of the two colours that can be there (k itself, or its mirror after a
        # flip)
        allowed = {k, FACE_FLIP_PERMUTATION[k]}
        dists = {j: np.abs(got - COLOURS[j]).max() for j in allowed}
        assert min(dists.values()) <= 40, (k, got, seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_flip_swaps_left_and_right_content(seed):
    img, kp = _marked_image(112)
    rng = np.random.default_rng(seed)
    aug = FaceAugment(
        AugmentConfig(flip_p=1.0, scale_min=0.9, scale_max=1.1, rotation_p=0.5, translate=0.05), 112
    )
    out, kp_out = aug(img, kp, rng)
    for k in range(5):  # new keypoint k sits on the blob of old keypoint FACE_FLIP_PERMUTATION[k]
        assert np.abs(_colour_at(out, kp_out[k]) - COLOURS[FACE_FLIP_PERMUTATION[k]]).max() <= 40


def test_pure_flip_matches_the_shared_convention():
    img, kp = _marked_image(112)
    cfg = AugmentConfig(flip_p=1.0, scale_min=1.0, scale_max=1.0, rotation_p=0.0, translate=0.0)
    out, kp_out = FaceAugment(cfg, 112)(img, kp, np.random.default_rng(0))
    assert np.array_equal(out, img[:, ::-1])
    assert np.allclose(kp_out, flip_keypoints(kp, 112), atol=1e-6)


def test_resize_only_without_rng_is_exact_for_keypoints():
    img, kp = _marked_image(112)
    out, kp_out = FaceAugment(AugmentConfig(), 56)(img, kp, None)
    assert out.shape == (56, 56, 3)
    # pixel-centre convention: x_out + 0.5 = (x_in + 0.5) / 2
    assert np.allclose(kp_out * 56, (kp * 112 + 0.5) / 2 - 0.5, atol=1e-5)


@pytest.mark.parametrize("name", ["photometric_p", "grayscale_p", "blur_p", "lowres_p", "cutout_p"])
def test_pixel_augmentations_change_pixels_not_keypoints(name):
    img, kp = _marked_image(64)
    base = AugmentConfig.disabled()
    setattr(base, name, 1.0)
    out, kp_out = FaceAugment(base, 64)(img, kp, np.random.default_rng(4))
    assert np.allclose(kp_out, kp, atol=1e-6)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match="uint8 RGB image"):
        FaceAugment(AugmentConfig(), 32)(np.zeros((10, 10), np.uint8), np.zeros((5, 2)), None)
