"""kprpe.files: the atomic writers shared by the face pipeline and evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kprpe.files import (
    atomic_write_bytes,
    atomic_write_text,
    read_npz,
    to_jsonable,
    write_csv,
    write_json,
    write_npz,
    write_png,
)


def test_atomic_write_creates_parents_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write_bytes(target, b"first") == target
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_text_is_utf8_without_newline_translation(tmp_path):
    path = atomic_write_text(tmp_path / "s.md", "± line\nnext\n")
    assert path.read_bytes() == "± line\nnext\n".encode()


def test_json_converts_numpy_paths_and_non_finite_numbers(tmp_path):
    data = {
        1: np.arange(3),
        "scalar": np.float32(0.5),
        "nan": float("nan"),
        "numpy_nan": np.float64("nan"),
        "inf": [float("inf"), -np.inf],
        "path": Path("x/y"),
        "nested": ({"k": np.int64(7)},),
    }
    expected = {"1": [0, 1, 2], "scalar": 0.5, "nan": None, "numpy_nan": None, "inf": ["inf", "-inf"],
                "path": "x/y", "nested": [{"k": 7}]}
    assert to_jsonable(data) == expected
    path = write_json(tmp_path / "r.json", data)
    text = path.read_text()
    assert text.endswith("}\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == expected


def test_csv_has_header_and_unix_line_ends(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["a", "b"], [(1, "x,y"), (2, "z")])
    assert path.read_bytes() == b'a,b\n1,"x,y"\n2,z\n'


def test_npz_round_trip_and_refuses_object_arrays(tmp_path):
    arrays = {"emb": np.arange(6, dtype=np.float32).reshape(2, 3), "names": np.array(["a", "bc"])}
    loaded = read_npz(write_npz(tmp_path / "e.npz", **arrays))
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
    with pytest.raises(TypeError, match="'bad' has dtype object"):
        write_npz(tmp_path / "o.npz", bad=np.array([{"x": 1}], dtype=object))
    assert not (tmp_path / "o.npz").exists()


def test_read_npz_never_unpickles(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, evil=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        read_npz(path)


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = write_png(tmp_path / "crops" / "c.png", image)
    with Image.open(path) as opened:
        assert opened.format == "PNG"
        np.testing.assert_array_equal(np.asarray(opened), image)


def test_atomic_writes_get_umask_permissions_not_mkstemp_0600(tmp_path):
    import os

    from kprpe.files import write_json

    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
