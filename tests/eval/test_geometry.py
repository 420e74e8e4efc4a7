from __future__ import annotations

import cv2
import numpy as np
import pytest

from kprpe.eval.geometry import (
    aligned_crop_params,
    box_crop_params,
    box_from_landmarks,
    crop_matrix,
    interpolate_crop,
    warp_face,
)
from kprpe.eval.images import crop_face
from kprpe.face.align import apply_transform, similarity_transform
from kprpe.keypoints import ARCFACE_TEMPLATE_112


def _rotated_face(angle=0.4, scale=1.8, offset=(150.0, 120.0)):
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_TEMPLATE_112 * scale) @ rot.T + np.array(offset)


def test_umeyama_recovers_a_similarity():
    src = np.random.default_rng(0).normal(size=(5, 2)) * 20
    m_true = np.array([[0.8, -0.6, 10.0], [0.6, 0.8, -4.0]]) * np.array([[1.5], [1.5]])
    m_true[:, 2] = [10.0, -4.0]
    dst = apply_transform(m_true, src)
    np.testing.assert_allclose(similarity_transform(src, dst), m_true, atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.zeros((5, 2)), dst)


def test_t0_aligns_landmarks_to_template():
    lm = _rotated_face()
    m = crop_matrix(aligned_crop_params(lm))
    np.testing.assert_allclose(apply_transform(m, lm), ARCFACE_TEMPLATE_112, atol=1e-9)


def test_t1_is_the_box_crop_resized():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    box = np.array([99.5, 49.5, 323.5, 273.5])  # edges of pixels 100..323 and 50..273: 224 px -> factor 2
    lm = _rotated_face(offset=(150.0, 100.0))
    crop, _ = crop_face(image, lm, t=1.0, box=box)
    reference = cv2.resize(image[50:274, 100:324], (112, 112), interpolation=cv2.INTER_LINEAR)
    assert np.abs(crop.astype(int) - reference.astype(int)).max() <= 1


def test_interpolation_endpoints_and_midpoint():
    lm = _rotated_face()
    start, end = aligned_crop_params(lm), box_crop_params(box_from_landmarks(lm))
    assert interpolate_crop(start, end, 0.0) == pytest.approx(start)
    p1 = interpolate_crop(start, end, 1.0)
    for a, b in zip(p1.__dict__.values(), end.__dict__.values(), strict=True):
        assert a == pytest.approx(b)
    mid = interpolate_crop(start, end, 0.5)
    assert mid.angle == pytest.approx(start.angle / 2)
    assert mid.sx == pytest.approx(np.sqrt(start.sx * end.sx))


def test_keypoints_follow_the_pixels():
    """Draw bright dots at the landmarks; after any warp the dots sit at the returned keypoints."""
    lm = _rotated_face(angle=-0.3, scale=2.0, offset=(160.0, 140.0))
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in lm:
        cv2.circle(image, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    lm_drawn = np.round(lm)
    for t in (0.0, 0.3, 0.7, 1.0):
        crop, kp = crop_face(image, lm_drawn, t=t)
        px = kp * 112
        for x, y in px:
            if 2 <= x < 110 and 2 <= y < 110:
                assert crop[int(round(y)), int(round(x))].max() > 100, (t, x, y)


def test_box_from_landmarks_is_square_and_contains_points():
    lm = _rotated_face()
    x1, y1, x2, y2 = box_from_landmarks(lm)
    assert x2 - x1 == pytest.approx(y2 - y1)
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
    with pytest.raises(ValueError, match="invalid box"):
        box_crop_params(np.array([10, 10, 5, 20]))


def test_warp_face_returns_normalised_keypoints():
    lm = _rotated_face()
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    crop, kp = warp_face(image, lm, aligned_crop_params(lm))
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(kp, ARCFACE_TEMPLATE_112 / 112, atol=1e-9)


def test_t1_is_the_face_pipelines_unaligned_crop():
    """One definition of "unaligned": the sweep's t=1 end is align_face(mode='unaligned') for any photo+box,
    a non-square box and a photo large enough to be shrunk before the warp included."""
    from kprpe.face.align import align_face, unaligned_crop

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (900, 700, 3), dtype=np.uint8)
    lm = _rotated_face(angle=0.2, scale=4.0, offset=(330.0, 420.0))
    for box in ((120.3, 180.7, 610.2, 760.9), (200.0, 250.0, 460.0, 560.0)):
        sweep_crop, sweep_kp = crop_face(image, lm, t=1.0, box=np.array(box))
        face = align_face(image, lm, mode="unaligned", box=box)
        np.testing.assert_array_equal(sweep_crop, face.image)
        np.testing.assert_allclose(sweep_kp, face.keypoints, atol=1e-12)
        np.testing.assert_array_equal(unaligned_crop(image, box)[0], face.image)
        # the interpolation's end point describes the same geometry
        np.testing.assert_allclose(
            crop_matrix(box_crop_params(np.array(box))), face.transform, atol=1e-9
        )


def test_box_file_slice_bounds_become_pixel_centre_boxes(tmp_path):
    from kprpe.eval.runs import read_boxes

    path = tmp_path / "boxes.txt"
    path.write_text("a.jpg 100 50 324 274\n")
    np.testing.assert_allclose(read_boxes(path)["a.jpg"], [99.5, 49.5, 323.5, 273.5])
