"""Damaged or hand-edited gallery index files are refused with one GalleryIndexError wherever they are read
(serve start-up, search query, remove, enrol --append all go through GalleryIndex.load), and no NaN template
is ever written (issue 32 item 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kprpe.cli import main
from kprpe.gallery.index import GalleryIndex, GalleryIndexError

DIM = 8


def _index_file(tmp_path):
    rng = np.random.default_rng(0)
    index = GalleryIndex(DIM, metadata={"model_fingerprint": "f" * 64}, backend="numpy")
    index.add({name: rng.normal(size=(3, DIM)) for name in ("ann", "bob", "cy")})
    return index.save(tmp_path / "gallery.npz")


def _rewrite(path, **changes):
    """The index file with some arrays (or metadata fields, given as ``meta_<key>``) replaced."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    metadata = json.loads(str(arrays["metadata"]))
    for key, value in changes.items():
        if key.startswith("index_"):
            metadata["index"][key.removeprefix("index_")] = value
        elif key.startswith("meta_"):
            metadata[key.removeprefix("meta_")] = value
        else:
            arrays[key] = value
    arrays["metadata"] = np.asarray(json.dumps(metadata))
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)
    return path


def test_a_good_file_round_trips(tmp_path):
    index = GalleryIndex.load(_index_file(tmp_path), backend="numpy")
    assert index.names == ["ann", "bob", "cy"]


def test_truncated_file_is_a_gallery_error(tmp_path):
    path = _index_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryIndexError, match="not a readable .npz"):
        GalleryIndex.load(path)


def test_bad_crc_is_a_gallery_error(tmp_path):
    """One flipped byte inside the stored templates: the zip member fails its CRC when read."""
    path = _index_file(tmp_path)
    data = bytearray(path.read_bytes())
    with np.load(path) as npz:
        templates = npz["templates"]
    at = bytes(data).find(templates.tobytes())
    assert at > 0
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryIndexError, match="not a readable .npz"):
        GalleryIndex.load(path)


def _scaled(path):
    with np.load(path) as npz:
        return npz["templates"] * 1000


BAD_FILES = {
    "nprobe text": (lambda p: {"index_nprobe": "abc"}, "nprobe must be a whole number"),
    "index a list": (lambda p: {"meta_index": [1, 2]}, "'index' must be an object"),
    "approximate_above text": (
        lambda p: {"index_approximate_above": "many"},
        "approximate_above must be a whole number",
    ),
    "integer fingerprint": (lambda p: {"meta_model_fingerprint": 12345}, "model_fingerprint must be text"),
    "text templates": (
        lambda p: {"templates": np.full((3, DIM), "0.1", dtype="<U8")},
        "templates are <U8 values",
    ),
    "templates x1000": (lambda p: {"templates": _scaled(p)}, "has norm .* not 1"),
    "NaN sum_norms": (lambda p: {"sum_norms": np.array([np.nan, 1.0, 1.0])}, "sum_norms must be finite"),
    "zero counts": (lambda p: {"counts": np.zeros(3, np.int64)}, "image count of at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_edited_fields_are_gallery_errors(tmp_path, case):
    change, message = BAD_FILES[case]
    path = _index_file(tmp_path)
    _rewrite(path, **change(path))
    with pytest.raises(GalleryIndexError, match=message):
        GalleryIndex.load(path)


def test_search_remove_on_a_damaged_file_is_one_line_and_changes_nothing(tmp_path, capsys):
    path = _index_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    before = path.read_bytes()
    code = main(["search", "remove", "ann", "--index", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kprpe search") and "not a readable .npz" in err
    assert "Traceback" not in err and path.read_bytes() == before


def test_nan_is_never_pooled_or_written(tmp_path):
    """In memory (a NaN sum norm once made `enrol --append` write NaN templates): refused, file untouched."""
    path = _index_file(tmp_path)
    index = GalleryIndex.load(path, backend="numpy")
    index._sum_norms[0] = np.nan
    with pytest.raises(GalleryIndexError, match="not finite"):
        index.add({"ann": np.ones((1, DIM))})
    index._templates[1] = np.nan
    before = path.read_bytes()
    with pytest.raises(GalleryIndexError, match="NaN or infinite"):
        index.save(path)
    assert path.read_bytes() == before


def test_serve_start_up_on_a_damaged_index_is_one_line(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from reference_vectors import DATA

    path = _index_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    code = main(["serve", "--weights", str(DATA / "tiny_kprpe.safetensors"), "--index", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not a readable .npz" in err and "Traceback" not in err
