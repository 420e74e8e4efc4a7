"""Decoding costs the decoded image plus its uint8 output, not ~10x its size: banded conversion into the
output, EXIF rotation on the uint8 array. Results equal converting the whole image at once with Pillow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from kprpe import images
from kprpe.images import load_image, to_rgb_uint8


def _whole_image_reference(image: Image.Image) -> np.ndarray:
    """The previous whole-image conversion, kept here as the specification of every mode's mapping."""
    mode = image.mode
    if mode in ("I;16", "I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
            gray = np.clip(np.rint(values * scale), 0, 255)
        else:
            top = 65535 if mode == "I;16" or values.max(initial=0) <= 65535 else np.iinfo(np.int32).max
            gray = np.rint(np.clip(values, 0, top) * (255.0 / top))
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return np.asarray(canvas.convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    h, w = 37, 29
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    floats = rng.random((h, w)).astype(np.float32)
    floats[0, 0] = np.nan
    palette = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    return {
        "RGB": Image.fromarray(rgba[..., :3]),
        "RGBA": Image.fromarray(rgba),
        "L": Image.fromarray(rgba[..., 0]),
        "LA": Image.fromarray(rgba[..., :2].copy(), mode="LA"),
        "1": Image.fromarray(rgba[..., 0] > 128),
        "P": palette,
        "P+transparency": transparent,
        "CMYK": Image.fromarray(rgba, mode="RGBA").convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)),
        "I (16-bit range)": Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32)),
        "I (32-bit range)": Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (h, w)).astype(np.int32)),
        "F in [0, 1]": Image.fromarray(floats),
        "F in [0, 255]": Image.fromarray(floats * 300),
    }


@pytest.mark.parametrize("name", sorted(_images()))
def test_banded_conversion_equals_the_whole_image_conversion(name, monkeypatch):
    image = _images()[name]
    monkeypatch.setattr(images, "_BAND_PIXELS", 5 * image.size[0])  # several bands, the last one short
    np.testing.assert_array_equal(to_rgb_uint8(image), _whole_image_reference(image))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), expected)


_PEAK = textwrap.dedent(
    """
    import sys
    from kprpe.images import load_image

    def status(field):  # kB figures of /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
    image = load_image(sys.argv[1])
    print(status("VmHWM") - before)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
@pytest.mark.parametrize("kind", ["gray16.png", "int32.tif", "float.tif", "rgb8.png"])
def test_decoding_memory_is_bounded_per_pixel(tmp_path, kind):
    side = 3000  # 9 megapixels: large enough that a full-image float64 copy (72 MB) would show
    if kind == "gray16.png":
        Image.fromarray(np.full((side, side), 1000, np.uint16)).save(tmp_path / kind)
    elif kind == "int32.tif":
        Image.fromarray(np.full((side, side), 70000, np.int32)).save(
            tmp_path / kind, compression="tiff_deflate"
        )
    elif kind == "float.tif":
        Image.fromarray(np.full((side, side), 0.5, np.float32)).save(
            tmp_path / kind, compression="tiff_deflate"
        )
    else:
        Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(tmp_path / kind)
    env = {
        "PYTHONPATH": str(Path(images.__file__).parents[1]),  # the kprpe under test
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / kind)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    peak = int(result.stdout.split()[-1])
    pixels = side * side
    # Pillow's decoded image (at most 4 bytes a pixel in these modes) + the uint8 RGB output (3 bytes a pixel)
    # + one band of intermediates (~2**20 pixels x 3 float64 arrays = 25 MB) + allocator slack. The
    # whole-image conversion it replaces peaked at 17-34 bytes a pixel.
    budget = 7 * pixels + 40 * 2**20
    assert peak <= budget, f"{kind}: peak {peak / 2**20:.0f} MB > budget {budget / 2**20:.0f} MB"
