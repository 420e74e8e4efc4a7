"""Images in: photos from files, encoded bytes from data sets, and the paths a user types — one home for all.

Everything here returns upright ``(H, W, 3)`` uint8 RGB or raises :class:`ImageLoadError` naming the file (or
the sample) and the reason, instead of a traceback from inside Pillow or OpenCV.

* :func:`load_image` reads photos. They arrive in every mode Pillow knows (grayscale, palette, RGBA, 16-bit
  PNG, CMYK JPEG) and often carry an EXIF orientation tag that cameras set instead of rotating pixels.
* :func:`decode_image` decodes the JPEG/PNG bytes stored in RecordIO files and ``.bin`` verification sets
  (OpenCV, as the insightface tools that wrote them).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import KprpeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "load_image",
    "decode_image",
    "DEFAULT_MAX_PIXELS",
    "max_pixels",
    "check_pixels",
    "to_rgb_uint8",
    "upright_rgb",
    "expand_image_paths",
]

# Extensions picked up when a directory is given (files named explicitly are always tried).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)


class ImageLoadError(KprpeError, ValueError):
    """A file (or stored image) could not be read as an image; the message names it and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _scale_wide_integers(array: np.ndarray, max_value: int) -> np.ndarray:
    """Map 0..max_value integers to 0..255 with rounding (65535 -> 255, 32768 -> 128), not clipping."""
    wide = np.clip(array.astype(np.float64), 0, max_value)
    return np.rint(wide * (255.0 / max_value)).astype(np.uint8)


# Rows converted per step hold about this many pixels: the wide (float64) intermediates of one band stay near
# 25 MB whatever the image's size, so decoding costs the decoded image plus 3 bytes a pixel of output (it cost
# 17-34 bytes a pixel when whole-image float64 copies were made).
_BAND_PIXELS = 1 << 20


def _band_converter(image: Image.Image, background: tuple[int, int, int]):
    """``band (Pillow image) -> (rows, W) gray or (rows, W, 3) RGB uint8`` for ``image``'s mode."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return lambda band: _scale_wide_integers(np.asarray(band), 65535)
    if mode == "I":
        # Pillow opens 16-bit grayscale PNGs as "I"; genuine 32-bit data is rare in photos.
        _, high = image.getextrema()
        top = 65535 if high <= 65535 else int(np.iinfo(np.int32).max)
        return lambda band: _scale_wide_integers(np.asarray(band), top)
    if mode == "F":
        high = max(
            float(np.nan_to_num(np.asarray(band, dtype=np.float64)).max(initial=0))
            for band in _bands(image)
        )
        scale = 255.0 if high <= 1.0 else 1.0

        def float_band(band):
            values = np.nan_to_num(np.asarray(band, dtype=np.float64))
            values *= scale
            np.rint(values, out=values)
            return np.clip(values, 0, 255, out=values).astype(np.uint8)

        return float_band
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:

        def composite(band):
            rgba = band.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            canvas.alpha_composite(rgba)
            return np.asarray(canvas.convert("RGB"), dtype=np.uint8)

        return composite
    if mode == "L":
        return lambda band: np.asarray(band, dtype=np.uint8)
    return lambda band: np.asarray(band if band.mode == "RGB" else band.convert("RGB"), dtype=np.uint8)


def _bands(image: Image.Image):
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield image.crop((0, top, width, min(height, top + rows)))


def to_rgb_uint8(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Any Pillow image -> ``(H, W, 3)`` uint8 RGB.

    Transparent pixels are composited over ``background`` (so a transparent PNG does not turn black where the
    alpha channel was zero); 16-bit and 32-bit integer images are rescaled from their full range; float images
    are taken as [0, 1] when their maximum is at most 1, else as [0, 255]. Converted a band of rows at a time
    into the output, so memory is the output plus one band whatever the mode.
    """
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    if width == 0 or height == 0:
        return out
    convert = _band_converter(image, background)
    top = 0
    for band in _bands(image):
        pixels = convert(band)
        rows = pixels.shape[0]
        out[top : top + rows] = pixels[:, :, None] if pixels.ndim == 2 else pixels
        top += rows
    return out


# EXIF orientation -> the same transposition as ImageOps.exif_transpose, done on the uint8 array (a view, then
# one 3-byte-a-pixel copy) instead of on Pillow's 4-byte-a-pixel image.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def upright_rgb(opened: Image.Image) -> np.ndarray:
    """A just-opened Pillow image (its size already checked) -> decoded, upright ``(H, W, 3)`` uint8 RGB.

    Peak memory is Pillow's decoded image plus the 3-byte-a-pixel output (plus one more output-sized copy
    when the EXIF orientation asks for a rotation, made after Pillow's image is freed)."""
    opened.load()  # decode now so truncated files fail here, not later
    try:
        orientation = opened.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a reason to refuse the photo (nor is it for Pillow)
        orientation = 1
    rgb = to_rgb_uint8(opened)
    opened.close()  # frees the decoded image before the rotation copies
    turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return np.ascontiguousarray(turn(rgb)) if turn is not None else rgb


# 8000 x 8000: above any camera's photo, far below what a decompression bomb claims
DEFAULT_MAX_PIXELS = 64_000_000


def max_pixels() -> int:
    """The largest image (width x height) any kprpe reader decodes: ``$KPRPE_MAX_PIXELS`` or 64 million."""
    text = os.environ.get("KPRPE_MAX_PIXELS")
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise ImageLoadError("KPRPE_MAX_PIXELS", f"must be a number of pixels, got {text!r}") from None
    if value <= 0:
        raise ImageLoadError("KPRPE_MAX_PIXELS", f"must be positive, got {value}")
    return value


def check_pixels(width: int, height: int, where, limit: int | None = None) -> None:
    """Refuse an image whose header announces more than ``limit`` (default :func:`max_pixels`) pixels, before
    decoding it: a few-KB file can claim 13000 x 13000 pixels (2.4 GB decoded)."""
    limit = max_pixels() if limit is None else int(limit)
    if width * height > limit:
        raise ImageLoadError(
            where,
            f"image of {width}x{height} = {width * height / 1e6:.1f} million pixels is larger than the limit "
            f"of {limit / 1e6:.1f} million (set KPRPE_MAX_PIXELS to raise it)",
        )


def load_image(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Read a photo as upright ``(H, W, 3)`` uint8 RGB; raise :class:`ImageLoadError` naming the file.

    Images larger than ``limit`` pixels (default :func:`max_pixels`) are refused from their header, before
    anything is decoded."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "no such file")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) before it errors; keep the user's console clean.
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                check_pixels(*opened.size, path, limit)
                rgb = upright_rgb(opened)
    except UnidentifiedImageError:
        raise ImageLoadError(
            path, "not an image file Pillow can read (unknown or unsupported format)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"image too large to decode safely ({exc})") from None
    except OSError as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            message = f"truncated or corrupt image data ({message})"
        raise ImageLoadError(path, message) from None
    except (ValueError, SyntaxError, EOFError) as exc:  # Pillow raises these for malformed headers
        raise ImageLoadError(path, f"corrupt image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError(path, f"decoded to an empty image of shape {rgb.shape}")
    return rgb


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header without decoding its pixels; None if Pillow does not
    know the format (OpenCV may still)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


def decode_image(
    data: bytes, where: str = "image", size: int | None = None, *, limit: int | None = None
) -> np.ndarray:
    """Encoded bytes -> uint8 RGB ``(H, W, 3)``, resized (bilinear) to ``size`` x ``size`` when given and
    different; raises :class:`ImageLoadError` naming ``where``. Images whose header announces more than
    ``limit`` pixels (default :func:`max_pixels`) are refused before decoding."""
    if not data:
        raise ImageLoadError(where, "empty image data")
    announced = _header_size(data)
    if announced is not None:
        check_pixels(*announced, where, limit)
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ImageLoadError(where, f"cannot decode image data ({len(data)} bytes; corrupt or not an image)")
    if announced is None:
        check_pixels(arr.shape[1], arr.shape[0], where, limit)
    rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB, dst=arr)  # in place: no second full-size copy
    if size is not None and rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return rgb


def expand_image_paths(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """Files as given, directories expanded to the image files they hold (sorted; hidden files skipped).

    Files named explicitly are kept whatever their extension so that a non-image file is reported as such
    rather than silently dropped. A path that does not exist is kept too: loading it reports the problem.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern: Sequence[Path] = sorted(path.rglob("*") if recursive else path.iterdir())
            images = [
                child
                for child in pattern
                if child.is_file()
                and not child.name.startswith(".")
                and child.suffix.lower() in IMAGE_EXTENSIONS
            ]
            if not images:  # an empty result would read as "0 faces", a success
                folders = [c for c in pattern if c.is_dir() and not c.name.startswith(".")]
                hint = (
                    f"; its {len(folders)} sub-folders are not searched — pass them (e.g. {path}/*/) instead"
                    if folders and not recursive
                    else ""
                )
                raise ImageLoadError(
                    path, f"the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}){hint}"
                )
            found.extend(images)
        else:
            found.append(path)
    return found
