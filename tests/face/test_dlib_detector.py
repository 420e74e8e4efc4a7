"""The dlib backend on a real face: skimage's astronaut photo."""

from __future__ import annotations

import math
import sys

import cv2
import numpy as np
import pytest

from kprpe.face import FacePipeline, MissingDependencyError, align_face, template_alignment_error
from kprpe.face.align import apply_transform

from .conftest import ASTRONAUT_KEYPOINTS

pytest.importorskip("dlib")


def test_detects_the_astronaut_face(astronaut_detection):
    x0, y0, x1, y1 = astronaut_detection.box
    assert 170 <= x0 <= 190 and 250 <= x1 <= 275 and 70 <= y0 <= 95 and 160 <= y1 <= 180
    assert astronaut_detection.score > 0.5
    assert astronaut_detection.landmarks.shape == (68, 2)


def test_landmarks_near_hand_checked_positions(astronaut_detection):
    errors = np.linalg.norm(astronaut_detection.keypoints - ASTRONAUT_KEYPOINTS, axis=1)
    assert errors.max() < 4.0, errors


def test_alignment_error_to_template_is_small(astronaut, astronaut_detection):
    face = align_face(astronaut, astronaut_detection.keypoints)
    # residual of a 4-parameter fit to 5 points of a smiling face: a few crop pixels, eyes tighter
    assert template_alignment_error(face) < 6.0
    from kprpe.keypoints import ARCFACE_TEMPLATE_112

    eye_errors = np.linalg.norm(face.keypoints_px[:2] - ARCFACE_TEMPLATE_112[:2], axis=1)
    assert eye_errors.max() < 4.0
    unaligned = align_face(
        astronaut, astronaut_detection.keypoints, mode="unaligned", box=astronaut_detection.box
    )
    assert template_alignment_error(unaligned) > template_alignment_error(face)


@pytest.mark.parametrize(
    "angle, scale, shift",
    [
        (25.0, 1.0, (0.0, 0.0)),
        (-30.0, 0.8, (60.0, 90.0)),
        (0.0, 1.6, (50.0, 150.0)),
        (10.0, 1.25, (-60.0, 10.0)),
    ],
)
def test_keypoints_recovered_under_known_affines(
    dlib_detector, astronaut, astronaut_detection, angle, scale, shift
):
    centre = (256.0, 256.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[:, 2] += shift
    warped = cv2.warpAffine(astronaut, matrix, (512, 512), flags=cv2.INTER_LINEAR)
    faces = dlib_detector.detect(warped)
    assert faces, f"no face after rotating {angle} and scaling {scale}"
    found = max(faces, key=lambda f: f.area).keypoints
    expected = apply_transform(matrix, astronaut_detection.keypoints)
    errors = np.linalg.norm(found - expected, axis=1)
    assert errors.max() < 3.0 * max(scale, 1.0), errors
    # and the aligned crops agree: same face, same place
    a = align_face(astronaut, astronaut_detection.keypoints)
    b = align_face(warped, found)
    assert np.abs(a.keypoints - b.keypoints).max() * 112 < 3.0


def test_five_point_model_eyes_measured_mouth_estimated(astronaut):
    from kprpe.face import DlibDetector

    faces = DlibDetector(landmark_model="5").detect(astronaut)
    assert len(faces) == 1 and faces[0].landmarks.shape == (5, 2)
    errors = np.linalg.norm(faces[0].keypoints - ASTRONAUT_KEYPOINTS, axis=1)
    assert errors[:2].max() < 3.0, errors  # eyes: measured
    assert errors[2:].max() < 8.0, errors  # nose tip and mouth: estimated from a mean face


def test_no_face_in_blank_or_noise(dlib_detector):
    assert dlib_detector.detect(np.full((200, 300, 3), 128, np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    assert dlib_detector.detect(noise) == []


def test_several_faces_largest_by_default_all_on_request(dlib_detector, astronaut):
    face = astronaut[40:240, 130:320]
    big = cv2.resize(face, None, fx=1.3, fy=1.3, interpolation=cv2.INTER_LINEAR)
    canvas = np.full((300, 480, 3), 200, np.uint8)
    canvas[10 : 10 + big.shape[0], 5 : 5 + big.shape[1]] = big  # face ~125 px, left
    canvas[60 : 60 + face.shape[0], 265 : 265 + face.shape[1]] = face  # face ~88 px, right
    pipeline = FacePipeline(dlib_detector)
    largest = pipeline.faces_in_image(canvas)
    assert len(largest) == 1 and largest[0].box[0] < 240
    both = FacePipeline(dlib_detector, all_faces=True).faces_in_image(canvas)
    assert len(both) == 2
    assert both[0].box[0] < 240 < both[1].box[0]  # largest first
    sizes = [f.extra["face_size"] for f in both]
    assert sizes[0] > sizes[1]


def test_tiny_face_found_by_automatic_upsampling(dlib_detector, astronaut):
    small = cv2.resize(astronaut, (160, 160), interpolation=cv2.INTER_AREA)  # face ~28 px wide
    faces = dlib_detector.detect(small)
    assert len(faces) >= 1
    best = max(faces, key=lambda f: f.area)
    expected = ASTRONAUT_KEYPOINTS * (160 / 512) + (160 / 512 - 1) / 2
    assert np.linalg.norm(best.keypoints - expected, axis=1).max() < 3.0
    fixed = type(dlib_detector)(upsample=0)
    assert fixed.detect(small) == []  # without upsampling dlib's HOG misses it
    too_small = FacePipeline(dlib_detector, min_face_size=60)
    from kprpe.face import NoFaceFound

    with pytest.raises(NoFaceFound, match="smaller than min_face_size"):
        too_small.faces_in_image(small)


def test_prealigned_crop_gets_landmarks_from_the_shape_model(dlib_detector, astronaut, astronaut_detection):
    aligned = align_face(astronaut, astronaut_detection.keypoints)
    pipeline = FacePipeline(dlib_detector, mode="prealigned")
    [face] = pipeline.faces_in_image(aligned.image)
    assert face.mode == "prealigned"
    assert np.abs(face.keypoints - aligned.keypoints).max() * 112 < 3.0


def test_missing_dlib_names_the_extra(monkeypatch):
    from kprpe.face import DlibDetector

    monkeypatch.setitem(sys.modules, "dlib", None)  # makes "import dlib" raise ImportError
    with pytest.raises(MissingDependencyError, match=r"kprpe\[face\]"):
        DlibDetector()


def test_missing_model_files_name_the_extra(tmp_path):
    from kprpe.face import DlibDetector

    with pytest.raises(MissingDependencyError, match=r"kprpe\[face\]"):
        DlibDetector(models_dir=tmp_path)


def test_bad_detector_options():
    from kprpe.face import DlibDetector

    with pytest.raises(ValueError, match="hog"):
        DlibDetector("mtcnn")
    with pytest.raises(ValueError, match="68"):
        DlibDetector(landmark_model="81")
    with pytest.raises(ValueError, match="upsample"):
        DlibDetector(upsample=9)


@pytest.mark.slow
def test_cnn_detector_agrees_with_hog(astronaut, astronaut_detection):
    from kprpe.face import DlibDetector

    faces = DlibDetector("cnn", upsample=0).detect(astronaut)
    assert len(faces) == 1
    assert np.linalg.norm(faces[0].keypoints - astronaut_detection.keypoints, axis=1).max() < 4.0
    assert not math.isnan(faces[0].score)


def test_weak_false_positive_does_not_win_largest_face(dlib_detector, astronaut, tmp_path):
    # JPEG-compressed, the astronaut photo gives a second, weak HOG detection on the shoulder badge whose box
    # is bigger than the face's: "largest face" must choose among confident detections only.
    from PIL import Image

    path = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut).save(path, quality=75)
    detections = dlib_detector.detect(np.asarray(Image.open(path).convert("RGB")))
    if len(detections) < 2:
        pytest.skip("this dlib build does not produce the badge false positive")
    face = FacePipeline(dlib_detector).faces_in_file(path)[0]
    x0, y0, x1, y1 = face.box
    assert x0 < ASTRONAUT_KEYPOINTS[2][0] < x1 and y0 < ASTRONAUT_KEYPOINTS[2][1] < y1  # the nose is inside
    badge = FacePipeline(dlib_detector, min_relative_score=0).faces_in_file(path)[0]
    assert badge.box[1] > 250  # without the score floor the bigger, weaker box below the face wins


def test_large_photos_are_searched_for_faces_at_a_bounded_size(astronaut, astronaut_detection):
    from kprpe.face.dlib_backend import DlibDetector

    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)  # 4x the photo
    detector = DlibDetector(max_detect_side=600)
    seen = []
    original = detector._boxes

    def spy(image):
        seen.append(image.shape)
        return original(image)

    detector._boxes = spy
    faces = detector.detect(big)
    face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))  # the face, not the badge
    assert seen and max(seen[0][:2]) == 600  # the detector never ran on the 2048-pixel photo
    # the landmarks are placed on the full-resolution photo, where the astronaut's are (x4)
    np.testing.assert_allclose(face.keypoints, astronaut_detection.keypoints * 4, atol=4 * 3.0)
    with pytest.raises(ValueError, match="max_detect_side"):
        DlibDetector(max_detect_side=10)
