"""Decoded-pixel caps and large-photo handling: a few-KB file must not cost gigabytes."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from kprpe.images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_image, load_image, max_pixels


def _png_bomb(width: int = 13000, height: int = 13000) -> bytes:
    """A valid, all-black grayscale PNG of width x height pixels: ~0.2 MB on disk, 169 MB decoded (2.4 GB once
    converted to float by a careless pipeline)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + black pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _png_bomb()


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, bomb):
    assert len(bomb) < 300_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"13000x13000 = 169\.0 million pixels .* KPRPE_MAX_PIXELS"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="bomb-bytes.*million pixels"):
        decode_image(bomb, "bomb-bytes")  # the .bin / RecordIO / upload path
    assert time.perf_counter() - start < 2.0  # nothing was decoded


def test_the_cap_is_configurable(tmp_path, monkeypatch):
    ok, png = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))
    assert decode_image(png.tobytes(), "small").shape == (100, 100, 3)
    monkeypatch.setenv("KPRPE_MAX_PIXELS", "5000")
    assert max_pixels() == 5000
    with pytest.raises(ImageLoadError, match="100x100"):
        decode_image(png.tobytes(), "small")
    (tmp_path / "a.png").write_bytes(png.tobytes())
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(tmp_path / "a.png")
    monkeypatch.setenv("KPRPE_MAX_PIXELS", "lots")
    with pytest.raises(ImageLoadError, match="KPRPE_MAX_PIXELS"):
        max_pixels()
    monkeypatch.delenv("KPRPE_MAX_PIXELS")
    assert max_pixels() == DEFAULT_MAX_PIXELS


def test_pack_lists_a_bomb_as_a_skipped_image(tmp_path, bomb):
    from kprpe.data.pack import pack_folder

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    ok, png = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    (tmp_path / "imgs" / "a" / "good.png").write_bytes(png.tobytes())
    (tmp_path / "imgs" / "a" / "bomb.png").write_bytes(bomb)
    report = pack_folder(tmp_path / "imgs", tmp_path / "out.rec", progress=False)
    assert report.num_images == 1
    assert [f for f, _ in report.failures] == ["a/bomb.png"] and "million pixels" in report.failures[0][1]
