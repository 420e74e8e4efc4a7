"""The thumbnail side store: keyed by a hash of the identity (no name becomes a path), a bounded number of
small JPEGs per identity, written atomically, removed whole, and nothing served that it did not write."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kprpe.gallery.thumbnails import MAX_THUMBNAIL_BYTES, ThumbnailError, ThumbnailStore, thumbnails_beside


def _crop(value: int) -> np.ndarray:
    return np.full((112, 112, 3), value, np.uint8)


def test_thumbnails_are_small_bounded_and_keyed_by_a_hash(tmp_path):
    store = ThumbnailStore(tmp_path / "t", per_identity=2)
    name = "../../<b>x</b>\u00e9"
    assert [store.add(name, _crop(v)) for v in (10, 200, 90)] == [0, 1, None]  # a third is not kept
    assert store.numbers(name) == [0, 1]
    (folder,) = (tmp_path / "t").iterdir()
    assert folder.name == store.key(name) and len(folder.name) == 32 and int(folder.name, 16) >= 0
    assert sorted(p.name for p in folder.iterdir()) == ["0.jpg", "1.jpg"]  # no temporary file left
    first = np.asarray(Image.open(io.BytesIO(store.read(store.key(name), 0))))
    # a flat grey crop stays flat grey through the resize and JPEG (at most one level of rounding)
    assert first.shape == (56, 56, 3) and np.abs(first.astype(int) - 10).max() <= 1
    assert store.key("a") != store.key("A") and store.numbers("someone else") == []


def test_remove_deletes_an_identity_whole(tmp_path):
    store = ThumbnailStore(tmp_path)
    store.add("a", _crop(1))
    store.add("b", _crop(2))
    assert store.remove("a") is True and store.remove("a") is False
    assert store.numbers("a") == [] and store.numbers("b") == [0]
    assert [p.name for p in tmp_path.iterdir()] == [store.key("b")]


def test_read_serves_only_what_the_store_wrote(tmp_path):
    store = ThumbnailStore(tmp_path)
    store.add("a", _crop(1))
    key = store.key("a")
    for bad_key, number in (("../a", 0), (key.upper(), 0), (key, 4), (key, -1), ("0" * 32, 0)):
        with pytest.raises(ThumbnailError):
            store.read(bad_key, number)
    (tmp_path / key / "1.jpg").write_bytes(b"x" * (MAX_THUMBNAIL_BYTES + 1))
    (tmp_path / "secret").write_bytes(b"s")
    (tmp_path / key / "2.jpg").symlink_to(tmp_path / "secret")
    for number in (1, 2):
        with pytest.raises(ThumbnailError, match="not a thumbnail this store wrote"):
            store.read(key, number)
    with pytest.raises(ThumbnailError, match="RGB uint8"):
        store.add("a", np.zeros((112, 112), np.uint8))


def test_default_folder_is_beside_the_gallery_file(tmp_path):
    assert thumbnails_beside(tmp_path / "gallery.npz") == tmp_path / "gallery.npz.thumbnails"


def test_search_remove_takes_the_thumbnails_with_it(tmp_path, capsys):
    from kprpe.cli import main
    from kprpe.gallery.index import GalleryIndex

    index = GalleryIndex(4, metadata={"model_fingerprint": "f"})
    index.add({"a": np.eye(4)[:1], "b": np.eye(4)[1:2]})
    path = index.save(tmp_path / "gallery.npz")
    store = ThumbnailStore(thumbnails_beside(path))
    store.add("a", _crop(1))
    store.add("b", _crop(2))
    assert main(["search", "remove", "a", "--index", str(path)]) == 0
    capsys.readouterr()
    assert store.numbers("a") == [] and store.numbers("b") == [0]
