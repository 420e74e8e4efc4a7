"""Large photos are shrunk with area averaging before the similarity warp (no aliasing, same geometry)."""

from __future__ import annotations

import numpy as np

from kprpe.face.align import (
    ANTIALIAS_BELOW_SCALE,
    align_face,
    apply_transform,
    downscale_for_warp,
    similarity_transform,
    transform_scale,
    warp_crop,
)
from kprpe.keypoints import ARCFACE_TEMPLATE_112

# A face whose eyes are ~1100 px apart in a 4000 px photo: about 0.03 crop pixels per photo pixel.
BIG_FACE = ARCFACE_TEMPLATE_112 * 31.0 + [300.0, 150.0]


def _ramp(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return 0.01 * xs + 0.02 * ys + 1.0


def test_shrunk_warp_keeps_the_geometry_exactly():
    # Area averaging and bilinear sampling both reproduce a linear ramp, so any error in the adjusted matrix
    # (a half-pixel shift, a wrong scale) would show as an offset from the ramp's true value.
    photo = _ramp(4000, 3000)
    matrix = similarity_transform(BIG_FACE, ARCFACE_TEMPLATE_112)
    small, adjusted = downscale_for_warp(photo, matrix)
    assert small.shape[0] < 400 and transform_scale(adjusted) > ANTIALIAS_BELOW_SCALE * 0.99
    crop = warp_crop(photo, matrix, antialias=True)
    rows, cols = np.mgrid[0:112, 0:112]
    crop_points = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float64)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    photo_points = apply_transform(inverse, crop_points)
    expected = 0.01 * photo_points[:, 0] + 0.02 * photo_points[:, 1] + 1.0
    inside = (photo_points[:, 0] > 20) & (photo_points[:, 0] < 2980) & (photo_points[:, 1] > 20)
    np.testing.assert_allclose(crop.ravel()[inside], expected[inside], rtol=0, atol=2e-3)


def test_fine_stripes_do_not_alias_into_the_crop():
    photo = np.zeros((4000, 4000, 3), dtype=np.uint8)
    photo[:, ::2] = 255  # one-pixel stripes: their average is mid grey at any crop scale
    matrix = similarity_transform(BIG_FACE, ARCFACE_TEMPLATE_112)
    naive = warp_crop(photo, matrix)
    filtered = warp_crop(photo, matrix, antialias=True)
    assert naive.std() > 60  # bilinear sampling lands on whole stripes: a moire of black and white
    assert filtered.std() < 3 and abs(filtered.mean() - 127.5) < 2
    aligned = align_face(photo, BIG_FACE)
    np.testing.assert_array_equal(aligned.image, filtered)


def test_photos_near_crop_scale_are_left_alone():
    photo = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    keypoints = ARCFACE_TEMPLATE_112 * 1.4 + 50.0  # 0.71 crop pixels per photo pixel
    matrix = similarity_transform(keypoints, ARCFACE_TEMPLATE_112)
    assert transform_scale(matrix) > ANTIALIAS_BELOW_SCALE
    image, same = downscale_for_warp(photo, matrix)
    assert image is photo and np.array_equal(same, matrix)
    np.testing.assert_array_equal(align_face(photo, keypoints).image, warp_crop(photo, matrix))
