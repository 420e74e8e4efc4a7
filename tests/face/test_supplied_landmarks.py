from __future__ import annotations

import json

import numpy as np
import pytest

from kprpe.face import FacePipeline, LandmarkFileError, NoFaceFound, SuppliedLandmarks
from kprpe.keypoints import ARCFACE_TEMPLATE_112

HEADER = "file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4"


def _row(name: str, points: np.ndarray, extra: str = "") -> str:
    return ",".join([name, *(f"{v:.4f}" for v in points.reshape(-1))]) + extra


def test_csv_lookup_by_path_name_and_stem(tmp_path):
    a = ARCFACE_TEMPLATE_112 * 2
    (tmp_path / "lm.csv").write_text(f"{HEADER}\n{_row('photos/a.jpg', a)}\n{_row('b', a + 5)}\n")
    table = SuppliedLandmarks.from_file(tmp_path / "lm.csv")
    image = np.zeros((300, 300, 3), np.uint8)
    np.testing.assert_allclose(table.detect(image, source="photos/a.jpg")[0].keypoints, a, atol=1e-4)
    np.testing.assert_allclose(table.detect(image, source="/elsewhere/a.jpg")[0].keypoints, a, atol=1e-4)
    np.testing.assert_allclose(table.detect(image, source="x/b.png")[0].keypoints, a + 5, atol=1e-4)
    with pytest.raises(NoFaceFound, match="no landmarks supplied"):
        table.detect(image, source="c.jpg")


def test_csv_several_faces_boxes_and_scores(tmp_path):
    small, big = ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112 * 2 + 100
    rows = [_row("g.jpg", small, ",10,20,100,110,0.9"), _row("g.jpg", big, ",,,,,")]
    text = f"{HEADER},box_x0,box_y0,box_x1,box_y1,score\n" + "".join(f"{row}\n" for row in rows)
    (tmp_path / "lm.csv").write_text(text)
    image = np.zeros((400, 400, 3), np.uint8)
    faces = SuppliedLandmarks.from_file(tmp_path / "lm.csv").detect(image, source="g.jpg")
    assert len(faces) == 2
    assert faces[0].box == (10.0, 20.0, 100.0, 110.0) and faces[0].score == pytest.approx(0.9)
    assert faces[1].score is None and faces[1].box[2] - faces[1].box[0] > 100  # box derived from keypoints
    crops = FacePipeline(SuppliedLandmarks.from_file(tmp_path / "lm.csv"), all_faces=True).faces_in_image(
        image, source="g.jpg"
    )
    assert [round(f.box[0]) for f in crops] == [round(faces[1].box[0]), 10]  # largest first


def test_normalized_coordinates(tmp_path):
    (tmp_path / "lm.csv").write_text(f"{HEADER}\n{_row('a.png', ARCFACE_TEMPLATE_112 / 112)}\n")
    table = SuppliedLandmarks.from_file(tmp_path / "lm.csv", normalized=True)
    face = table.detect(np.zeros((224, 224, 3), np.uint8), source="a.png")[0]
    np.testing.assert_allclose(face.keypoints, ARCFACE_TEMPLATE_112 * 2, atol=0.02)  # 4 decimals in the file


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,x0,y0\na.jpg,1,2\n", "missing columns"),
        (f"{HEADER}\na.jpg,1,2,3,4,5,6,7,8,9\n", "needs a value"),
        (f"{HEADER}\na.jpg,1,2,3,4,5,6,7,8,9,zz\n", r"lm.csv:2 column y4: 'zz' is not a number"),
        (f"{HEADER}\na.jpg,1,2,3,4,5,6,7,8,9,nan\n", "not finite"),
        (f"{HEADER},box_x0,box_y0,box_x1,box_y1\na.jpg,1,2,3,4,5,6,7,8,9,10,1,2,,\n", "all four box columns"),
        (f"{HEADER}\n", "lists no faces"),
        (f"{HEADER}\n,1,2,3,4,5,6,7,8,9,10\n", "empty 'file'"),
    ],
)
def test_malformed_csv_errors_name_file_and_row(tmp_path, text, message):
    (tmp_path / "lm.csv").write_text(text)
    with pytest.raises(LandmarkFileError, match=message):
        SuppliedLandmarks.from_file(tmp_path / "lm.csv")


def test_json_formats(tmp_path):
    t = ARCFACE_TEMPLATE_112.tolist()
    data = {
        "one.jpg": t,
        "obj.jpg": {"keypoints": t, "box": [0, 0, 112, 112], "score": 0.5},
        "two.jpg": [{"keypoints": t}, {"keypoints": (ARCFACE_TEMPLATE_112 * 2).tolist()}],
        "pairs.jpg": [t, t],
    }
    (tmp_path / "lm.json").write_text(json.dumps(data))
    table = SuppliedLandmarks.from_file(tmp_path / "lm.json")
    image = np.zeros((300, 300, 3), np.uint8)
    assert [len(table.detect(image, source=k)) for k in data] == [1, 1, 2, 2]
    assert table.detect(image, source="obj.jpg")[0].box == (0.0, 0.0, 112.0, 112.0)
    listed = [{"file": "x.jpg", "keypoints": t}]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    assert len(SuppliedLandmarks.from_file(tmp_path / "list.json").detect(image, source="x.jpg")) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"a.jpg": [[1, 2], [3, 4]]}', r"need 5 \(x, y\) keypoints"),
        ('{"a.jpg": {"box": [0, 0, 1, 1]}}', "needs a 'keypoints'"),
        ('"text"', "top level"),
        ('{"a.jpg": {"keypoints": [[1,2],[3,4],[5,6],[7,8],[9,10]], "box": [5, 5, 1, 1]}}', "box must be"),
    ],
)
def test_malformed_json(tmp_path, content, message):
    (tmp_path / "lm.json").write_text(content)
    with pytest.raises(LandmarkFileError, match=message):
        SuppliedLandmarks.from_file(tmp_path / "lm.json")


def test_ambiguous_and_missing_files(tmp_path):
    t = ARCFACE_TEMPLATE_112
    (tmp_path / "lm.csv").write_text(f"{HEADER}\n{_row('x/a.jpg', t)}\n{_row('y/a.jpg', t)}\n")
    table = SuppliedLandmarks.from_file(tmp_path / "lm.csv")
    with pytest.raises(LandmarkFileError, match="ambiguous"):
        table.detect(np.zeros((10, 10, 3), np.uint8), source="z/a.jpg")
    assert len(table.detect(np.zeros((10, 10, 3), np.uint8), source="x/a.jpg")) == 1
    with pytest.raises(LandmarkFileError, match="does not exist"):
        SuppliedLandmarks.from_file(tmp_path / "none.csv")
    (tmp_path / "lm.txt").write_text("x")
    with pytest.raises(LandmarkFileError, match="unsupported extension"):
        SuppliedLandmarks.from_file(tmp_path / "lm.txt")


def test_supplied_landmarks_drive_alignment_like_dlib(astronaut, astronaut_detection, tmp_path):
    from PIL import Image

    Image.fromarray(astronaut).save(tmp_path / "astro.png")
    table = SuppliedLandmarks.from_arrays({"astro.png": astronaut_detection.keypoints})
    [face] = FacePipeline(table).faces_in_file(tmp_path / "astro.png")
    from kprpe.face import align_face

    reference = align_face(astronaut, astronaut_detection.keypoints)
    np.testing.assert_allclose(face.keypoints, reference.keypoints, atol=1e-9)
    np.testing.assert_array_equal(face.image, reference.image)


def test_face_package_imports_and_works_without_dlib():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['dlib'] = None\n"
        "import numpy as np, kprpe.face as f\n"
        "from kprpe.keypoints import ARCFACE_TEMPLATE_112 as T\n"
        "p = f.FacePipeline(f.SuppliedLandmarks.from_arrays({'a.png': T}))\n"
        "[face] = p.faces_in_image(np.zeros((112, 112, 3), np.uint8), source='a.png')\n"
        "assert abs(face.keypoints * 112 - T).max() < 1e-9\n"
        "try:\n    f.DlibDetector()\nexcept f.MissingDependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "kprpe[face]" in out


def test_a_68_point_file_is_refused_not_read_as_its_first_5_points(tmp_path):
    from kprpe.face.landmark_files import SuppliedLandmarks
    from kprpe.landmarks import LandmarkFileError

    columns = ",".join(f"{axis}{i}" for i in range(68) for axis in "xy")
    (tmp_path / "lm68.csv").write_text("file," + columns + "\na.png," + ",".join(["10"] * 136) + "\n")
    with pytest.raises(LandmarkFileError, match="68 points.*5 ArcFace points"):
        SuppliedLandmarks.from_file(tmp_path / "lm68.csv")


def test_deeply_nested_json_is_a_landmark_error(tmp_path):
    from kprpe.face.landmark_files import SuppliedLandmarks
    from kprpe.landmarks import LandmarkFileError

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LandmarkFileError, match="nests JSON too deeply"):
        SuppliedLandmarks.from_file(tmp_path / "deep.json")
