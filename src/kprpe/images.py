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
from PIL import Image, ImageOps, UnidentifiedImageError

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


def to_rgb_uint8(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Any Pillow image -> ``(H, W, 3)`` uint8 RGB.

    Transparent pixels are composited over ``background`` (so a transparent PNG does not turn black where the
    alpha channel was zero); 16-bit and 32-bit integer images are rescaled from their full range; float images
    are taken as [0, 1] when their maximum is at most 1, else as [0, 255].
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = _scale_wide_integers(np.asarray(image), 65535)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "I":
        values = np.asarray(image)
        # Pillow opens 16-bit grayscale PNGs as "I"; genuine 32-bit data is rare in photos.
        top = 65535 if values.max(initial=0) <= 65535 else int(np.iinfo(np.int32).max)
        gray = _scale_wide_integers(values, top)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return np.asarray(canvas.convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


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
                opened.load()  # decode now so truncated files fail here, not later
                upright = ImageOps.exif_transpose(opened)
                rgb = to_rgb_uint8(upright if upright is not None else opened)
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
    rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
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
