"""Verification sets in the insightface ``.bin`` format, read without ever executing pickled code.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of ``2N`` encoded images (JPEG/PNG bytes),
``issame`` a list of ``N`` booleans; pair ``k`` is images ``2k`` and ``2k+1``. A pickle is a program, so
plain ``pickle.load`` on a downloaded file can run anything. :class:`RestrictedUnpickler` resolves no global
except one harmless byte-string constructor, so a crafted file fails with :class:`UnsafePickleError`
before any of its code runs.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KprpeError
from ..files import atomic_write_bytes
from ..images import decode_image  # noqa: F401  (where evaluation code has imported it from)

__all__ = [
    "UnsafePickleError",
    "BinFormatError",
    "RestrictedUnpickler",
    "restricted_loads",
    "VerificationBin",
    "read_verification_bin",
    "write_verification_bin",
    "decode_image",
]


class UnsafePickleError(KprpeError, pickle.UnpicklingError):
    """The pickle asks for a global (a function or class) that a verification set never needs."""


class BinFormatError(KprpeError, ValueError):
    """The file is a valid pickle but not a verification set."""


def _latin1_encode(text, encoding="latin1"):
    """Python 3 pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(str, 'latin1')``; allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a pickle")
    return codecs.encode(text, "latin1")


def _numpy_array_globals() -> dict[tuple[str, str], object]:
    """The four globals a pickled plain ``numpy.ndarray`` names, under NumPy 1 and NumPy 2 module paths.

    Taken from live objects (not by importing ``numpy.core``, deprecated under NumPy 2). Only plain arrays
    can be built through them: ``_reconstruct``'s class argument can only be ``ndarray`` itself, because no
    other class is reachable from the pickle."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    return {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only lists, tuples, dicts, str, bytes, bool, int, float and None (and, with
    ``numpy_arrays=True``, plain numpy arrays).

    ``find_class`` is the only door through which a pickle reaches code (``os.system``, ``eval``, any
    class); it is closed except for ``_codecs.encode`` with a latin-1 string (old-protocol ``bytes``) and,
    when asked, the array constructors of :func:`_numpy_array_globals`. Persistent ids are refused as well.
    """

    def __init__(self, file, *, numpy_arrays: bool = False, **kwargs):
        super().__init__(file, **kwargs)
        self._numpy = _numpy_array_globals() if numpy_arrays else {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self._numpy:
            return self._numpy[(module, name)]
        allowed = "numeric arrays" if self._numpy else "image bytes and booleans"
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}': this file should only hold {allowed}, so it is "
            "corrupt or malicious"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a pickle")


def restricted_loads(data: bytes, *, numpy_arrays: bool = False):
    """``pickle.loads`` through :class:`RestrictedUnpickler` (Python 2 ``str`` read as bytes); with
    ``numpy_arrays=True`` plain numpy arrays are allowed too (check their dtype: object arrays can be
    built, though only from the same harmless values)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes", numpy_arrays=numpy_arrays).load()


@dataclass
class VerificationBin:
    """Encoded images (``2N``) and pair labels (``N``) of one verification set."""

    name: str
    encoded_images: list[bytes]
    issame: np.ndarray  # (N,) bool
    path: Path | None = None  # the file it was read from (None: built in memory)

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def __len__(self) -> int:
        return len(self.encoded_images)


def read_verification_bin(path: str | os.PathLike) -> VerificationBin:
    """Read and validate a ``.bin`` verification set (images are decoded later, on demand)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        obj = restricted_loads(path.read_bytes())
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise BinFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFormatError(
            f"{path}: expected lists, got images={type(images).__name__}, issame={type(issame).__name__}"
        )
    for i, item in enumerate(images):
        if not isinstance(item, (bytes, bytearray)):
            raise BinFormatError(f"{path}: image {i} is {type(item).__name__}, expected encoded bytes")
    for i, flag in enumerate(issame):
        if not isinstance(flag, (bool, int)) or flag not in (0, 1):
            raise BinFormatError(f"{path}: issame[{i}] is {flag!r}, expected a boolean")
    if len(images) != 2 * len(issame):
        raise BinFormatError(
            f"{path}: {len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})"
        )
    if not issame:
        raise BinFormatError(f"{path}: no pairs")
    # A pickle can reference one buffer many times (its memo); copy each distinct buffer once, so a small file
    # that names one large bytearray thousands of times costs one buffer, not thousands of copies.
    distinct: dict[int, bytes] = {}
    encoded = [distinct.setdefault(id(b), b if isinstance(b, bytes) else bytes(b)) for b in images]
    return VerificationBin(
        name=path.stem,
        encoded_images=encoded,
        issame=np.asarray([bool(f) for f in issame], dtype=bool),
        path=path,
    )


def write_verification_bin(path: str | os.PathLike, encoded_images: list[bytes], issame) -> None:
    """Write a ``.bin`` readable by insightface tools and :func:`read_verification_bin` (atomic)."""
    issame = [bool(x) for x in issame]
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"{len(encoded_images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    payload = pickle.dumps(([bytes(b) for b in encoded_images], issame), protocol=4)
    atomic_write_bytes(path, payload)
