from __future__ import annotations

import math

import numpy as np
import pytest

from kprpe.face.align import (
    TEMPLATE_FACE_BOX,
    AlignmentError,
    align_face,
    apply_transform,
    box_crop_transform,
    box_from_keypoints,
    similarity_transform,
    template_alignment_error,
)
from kprpe.keypoints import ARCFACE_TEMPLATE_112


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]]
    )


@pytest.mark.parametrize(
    "angle, scale, tx, ty", [(0, 1, 0, 0), (30, 2.5, 100, -40), (-75, 0.4, 7, 300), (180, 1.2, 5, 5)]
)
def test_similarity_transform_recovers_exact_transform(angle, scale, tx, ty):
    truth = _similarity(angle, scale, tx, ty)
    source = np.random.default_rng(1).uniform(0, 200, (5, 2))
    estimated = similarity_transform(source, apply_transform(truth, source))
    np.testing.assert_allclose(estimated, truth, atol=1e-9)


def test_similarity_transform_never_reflects():
    source = ARCFACE_TEMPLATE_112.copy()
    mirrored = source * [-1, 1]
    matrix = similarity_transform(source, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_similarity_transform_rejects_degenerate_and_bad_shapes():
    with pytest.raises(AlignmentError, match="one place"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(AlignmentError, match="non-finite"):
        similarity_transform(np.full((5, 2), np.nan), ARCFACE_TEMPLATE_112)
    with pytest.raises(AlignmentError, match="differ in shape"):
        similarity_transform(np.zeros((4, 2)) + np.arange(4)[:, None], ARCFACE_TEMPLATE_112)


def test_align_template_photo_is_identity():
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    face = align_face(image, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(face.transform, np.eye(2, 3), atol=1e-9)
    np.testing.assert_array_equal(face.image, image)
    np.testing.assert_allclose(face.keypoints, ARCFACE_TEMPLATE_112 / 112, atol=1e-12)
    assert template_alignment_error(face) < 1e-9


def test_aligned_crop_content_follows_keypoints():
    """A photo made by warping a crop with a known similarity aligns back to (nearly) the same crop."""
    import cv2

    rng = np.random.default_rng(3)
    crop = cv2.resize(
        rng.integers(0, 255, (14, 14, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC
    )
    forward = _similarity(25, 2.0, 150, 40)
    photo = cv2.warpAffine(crop, forward, (400, 400), flags=cv2.INTER_CUBIC)
    face = align_face(photo, apply_transform(forward, ARCFACE_TEMPLATE_112))
    np.testing.assert_allclose(face.keypoints * 112, ARCFACE_TEMPLATE_112, atol=1e-6)
    inner = slice(10, 102)
    assert np.abs(face.image[inner, inner].astype(int) - crop[inner, inner].astype(int)).mean() < 3


def test_unaligned_mode_crops_box_and_keypoints_follow():
    image = np.zeros((300, 400, 3), np.uint8)
    keypoints = ARCFACE_TEMPLATE_112 * 2 + [100, 50]
    box = (120.0, 80.0, 300.0, 240.0)  # 180 x 160: each axis resized to 112 (the paper's box resize)
    face = align_face(image, keypoints, mode="unaligned", box=box)
    scale = np.array([112 / 180, 112 / 160])
    expected = (keypoints - [210, 160]) * scale + 55.5
    np.testing.assert_allclose(face.keypoints * 112, expected, atol=1e-9)
    assert face.mode == "unaligned" and face.box == box


def test_box_crop_transform_maps_box_edges_to_crop_edges():
    matrix = box_crop_transform((-0.5, -0.5, 99.5, 99.5))
    np.testing.assert_allclose(
        apply_transform(matrix, [[-0.5, -0.5], [99.5, 99.5]]), [[-0.5, -0.5], [111.5, 111.5]]
    )
    with pytest.raises(AlignmentError, match="no area"):
        box_crop_transform((10, 10, 5, 20))


def test_box_crop_transform_resizes_a_non_square_box_without_squaring():
    # the paper's "unaligned" crop is the box simply resized: a 50x100 box fills the crop on both axes
    matrix = box_crop_transform((9.5, 19.5, 59.5, 119.5))
    np.testing.assert_allclose(
        apply_transform(matrix, [[9.5, 19.5], [59.5, 119.5]]), [[-0.5, -0.5], [111.5, 111.5]]
    )


def test_box_from_keypoints_on_template_is_template_box():
    np.testing.assert_allclose(box_from_keypoints(ARCFACE_TEMPLATE_112), TEMPLATE_FACE_BOX, atol=1e-9)


def test_prealigned_requires_112_crop():
    with pytest.raises(AlignmentError, match="112x112"):
        align_face(np.zeros((100, 120, 3), np.uint8), ARCFACE_TEMPLATE_112, mode="prealigned")
    crop = np.full((112, 112, 3), 7, np.uint8)
    face = align_face(crop, ARCFACE_TEMPLATE_112 + 3, mode="prealigned")
    np.testing.assert_array_equal(face.image, crop)
    np.testing.assert_allclose(face.keypoints, (ARCFACE_TEMPLATE_112 + 3) / 112)


def test_align_face_input_errors():
    with pytest.raises(AlignmentError, match="uint8"):
        align_face(np.zeros((50, 50), np.uint8), ARCFACE_TEMPLATE_112)
    with pytest.raises(AlignmentError, match=r"\(5, 2\)"):
        align_face(np.zeros((50, 50, 3), np.uint8), ARCFACE_TEMPLATE_112[:4])
    with pytest.raises(AlignmentError, match="unknown alignment mode"):
        align_face(np.zeros((50, 50, 3), np.uint8), ARCFACE_TEMPLATE_112, mode="warped")
