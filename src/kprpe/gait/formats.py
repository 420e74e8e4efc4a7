"""The OpenGait layout that gait data sets ship in, read without ever running pickled code.

Layout: ``root/<id>/<type>/<view>/*.pkl`` (Gait3D: ``0000/camid1_videoid2/seq0/``). Each ``.pkl`` is one
pickled numpy array per modality with the frames first: silhouettes ``uint8 [T, 64, 44]`` (or
``[T, 64, 64]``), 2-D pose ``float [T, 17, 3]`` (COCO-17 ``x, y, confidence``, pixels of the silhouette
frame when packed by kprpe). Modalities are taken in file-name order and must have the same ``T``.

A pickle is a program, so :class:`NumpyUnpickler` resolves only what a plain numeric array needs
(``ndarray``, ``dtype``, numpy's array reconstructors, latin-1 ``bytes``); a file naming anything else fails
with :class:`UnsafePickleError` before any of its code runs.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from ..files import atomic_write_bytes
from ..safe_pickle import NUMERIC_KINDS, RestrictedUnpickler
from ..safe_pickle import UnsafePickleError as SafePickleError

__all__ = [
    "GaitFormatError",
    "UnsafePickleError",
    "NumpyUnpickler",
    "load_array_pickle",
    "dump_array_pickle",
    "load_sequence",
    "is_pose",
    "check_pose",
    "NUM_JOINTS",
]

NUM_JOINTS = 17  # COCO-17
ARRAY_KINDS = NUMERIC_KINDS  # bool, signed, unsigned, float: what silhouettes and keypoints are made of


class GaitFormatError(KprpeError, ValueError):
    """A gait file or sequence folder that breaks the OpenGait layout (names the file and the problem)."""


class UnsafePickleError(GaitFormatError, SafePickleError):
    """The pickle names a global that a plain numeric numpy array never needs."""


class NumpyUnpickler(RestrictedUnpickler):
    """The project's restricted unpickler (:mod:`kprpe.safe_pickle`) in its numeric-array mode."""

    def __init__(self, file, **kwargs):
        super().__init__(file, numpy_arrays=True, what="one numeric numpy array (a gait .pkl)", **kwargs)


def load_array_pickle(path: str | os.PathLike) -> np.ndarray:
    """One numeric numpy array from a ``.pkl`` through :class:`NumpyUnpickler`; anything else (another
    object, an object/structured dtype, a truncated file) raises :class:`GaitFormatError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GaitFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except SafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        KeyError,
        MemoryError,
    ) as exc:
        raise GaitFormatError(f"{path}: not a readable array pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, np.ndarray) or type(obj) is not np.ndarray:
        raise GaitFormatError(f"{path}: expected one numpy array, got {type(obj).__name__}")
    if obj.dtype.kind not in ARRAY_KINDS or obj.dtype.hasobject or obj.dtype.names:
        raise GaitFormatError(f"{path}: expected a numeric array, got dtype {obj.dtype}")
    return obj


def dump_array_pickle(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an OpenGait ``.pkl`` (protocol 4, what OpenGait's tools read), atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in ARRAY_KINDS:
        raise TypeError(f"gait arrays are numeric; got dtype {array.dtype}")
    return atomic_write_bytes(path, pickle.dumps(array, protocol=4))


def is_pose(array: np.ndarray) -> bool:
    """A ``[T, 17, 3]`` float array: COCO-17 keypoints (x, y, confidence) per frame."""
    return array.ndim == 3 and array.shape[1:] == (NUM_JOINTS, 3) and array.dtype.kind == "f"


# the confidence from which a joint's position is trusted (docs/gait.md draws these green)
CONFIDENT = 0.5


def check_pose(pose: np.ndarray, where: str, frame_size: tuple[int, int] | None = None) -> None:
    """Raise :class:`GaitFormatError` for NaN/inf values, negative confidences, or (``frame_size=(H, W)``)
    confident joints (confidence >= 0.5) more than one frame size outside the frame, which means the
    keypoints are in another coordinate frame than the silhouettes (e.g. raw detector pixels that were never
    packed). Unconfident joints may legitimately lie far outside: when an occluder hides the upper body, the
    pretreatment crops the silhouette to the visible rows and stretches them to 64, and the hidden head's
    guess lands several frame heights above the frame."""
    if not np.all(np.isfinite(pose)):
        raise GaitFormatError(f"{where}: {int(np.sum(~np.isfinite(pose)))} keypoint values are NaN/inf")
    confidence = pose[..., 2]
    if np.any(confidence < 0):
        raise GaitFormatError(f"{where}: {int(np.sum(confidence < 0))} keypoint confidences are negative")
    if frame_size is not None:
        height, width = frame_size
        seen = confidence >= CONFIDENT
        x, y = pose[..., 0][seen], pose[..., 1][seen]
        outside = (x < -width) | (x > 2 * width) | (y < -height) | (y > 2 * height)
        if np.any(outside):
            raise GaitFormatError(
                f"{where}: {int(outside.sum())} confident keypoints lie far outside the {height}x{width} "
                "silhouette frame (keypoints in another coordinate frame? pack them with `kprpe gait pack`)"
            )


@dataclass(frozen=True)
class _Modality:
    name: str
    path: Path


def _sequence_files(seq_dir: Path, root: Path | None) -> list[_Modality]:
    if not seq_dir.is_dir():
        raise GaitFormatError(f"{seq_dir}: not a sequence folder")
    files = sorted(p for p in seq_dir.iterdir() if p.suffix == ".pkl" and not p.name.startswith("."))
    if root is not None:
        top = root.resolve()
        for p in [seq_dir, *files]:
            resolved = p.resolve()
            if resolved != top and top not in resolved.parents:
                raise GaitFormatError(f"{p}: is a link that leaves the data root {root} (to {resolved})")
    if not files:
        raise GaitFormatError(f"{seq_dir}: empty sequence (no .pkl files)")
    return [_Modality(p.stem, p) for p in files]


def load_sequence(
    seq_dir: str | os.PathLike, *, root: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """Every modality of one sequence folder, ``{file stem: array}`` in file-name order (OpenGait's order).

    Checks, each failing with :class:`GaitFormatError` naming the folder: at least one ``.pkl``; every array
    has frames first and at least one frame; the same ``T`` in every modality; pose modalities (float
    ``[T, 17, 3]``) finite, with non-negative confidences and, beside ``[T, H, W]`` silhouettes, inside that
    frame (give or take one frame size). ``root``: refuse files or folders that are links leaving it.
    """
    seq_dir = Path(seq_dir)
    modalities = _sequence_files(seq_dir, Path(root) if root is not None else None)
    arrays = {m.name: load_array_pickle(m.path) for m in modalities}
    lengths = {}
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] == 0:
            raise GaitFormatError(f"{seq_dir}: modality {name!r} is empty (shape {array.shape})")
        lengths[name] = array.shape[0]
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{n}: {t}" for n, t in lengths.items())
        raise GaitFormatError(f"{seq_dir}: modalities differ in frame count ({detail}); they must be equal")
    frames = [a.shape[1:] for a in arrays.values() if a.ndim == 3 and not is_pose(a)]
    for name, array in arrays.items():
        if is_pose(array):
            check_pose(array, f"{seq_dir}/{name}.pkl", tuple(frames[0]) if frames else None)
    return arrays
