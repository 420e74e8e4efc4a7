from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kprpe.images import ImageLoadError, expand_image_paths, load_image


@pytest.fixture()
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = (200, 30, 40)
    image[:, 30:] = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    return image


def test_rgb_png_round_trip(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_and_bilevel_become_three_equal_channels(tmp_path, rgb):
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(gray))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    gray.convert("1").save(tmp_path / "b.png")
    assert set(np.unique(load_image(tmp_path / "b.png"))) <= {0, 255}


def test_palette_image(tmp_path, rgb):
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))


def test_rgba_composited_over_white_not_black(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0  # fully transparent band
    rgba[10:20, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert (out[:10] == 255).all()
    np.testing.assert_array_equal(out[20:], rgb[20:])
    half = out[10:20].astype(int)
    expected = (rgb[10:20].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(half - expected).max() <= 2


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    image.info["transparency"] = 0
    image.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    assert (out[:, :4] == (255, 0, 0)).all()
    assert (out[:, 4:] == 255).all()  # transparent index -> white background


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")  # really stored as 16-bit
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all()


def test_cmyk_jpeg(tmp_path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == rgb.shape
    assert np.abs(out[:, :25].astype(int) - rgb[:, :25].astype(int)).mean() < 8  # flat colour region survives


def test_exif_orientation_is_applied(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (60, 40, 3)  # upright: width and height swapped
    # rotating 90 degrees clockwise puts the flat red left half on top
    assert np.abs(out[:25].astype(int) - (200, 30, 40)).mean() < 6
    assert np.abs(out[35:].astype(int) - (200, 30, 40)).mean() > 30


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("hello, not an image"), "not an image file"),
        (lambda p: p.write_bytes(b""), "not an image file"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path, rgb):
    big = np.tile(rgb, (8, 8, 1))
    Image.fromarray(big).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(tmp_path / "cut.jpg")
    assert "cut.jpg" in str(info.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_expand_image_paths(tmp_path, rgb):
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.JPG", ".hidden.png"):
        Image.fromarray(rgb).save(tmp_path / "d" / name, format="PNG")
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "d" / "sub" / "c.png")
    listed = expand_image_paths([tmp_path / "d", tmp_path / "explicit.txt"])
    assert [p.name for p in listed] == ["a.JPG", "b.png", "explicit.txt"]
    assert [p.name for p in expand_image_paths([tmp_path / "d"], recursive=True)] == [
        "a.JPG",
        "b.png",
        "c.png",
    ]
