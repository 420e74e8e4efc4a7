"""Pickles read without ever running the code they name: the one restricted unpickler of the project.

A pickle is a program: plain ``pickle.load`` on a downloaded file can call anything it names. The data sets
that ship as pickles (insightface ``.bin`` verification sets, OpenGait ``.pkl`` sequences, the classic
``mnist.pkl.gz``) hold only plain values and numeric numpy arrays, so :class:`RestrictedUnpickler` resolves
no global except a latin-1 ``bytes`` constructor and — with ``numpy_arrays=True`` — numpy's array builders,
wrapped so that they build only plain ``bool``/integer/float arrays. A file naming anything else fails with
:class:`UnsafePickleError` before any of its code runs.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from .errors import KprpeError

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "restricted_loads", "NUMERIC_KINDS"]

NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: the only array kinds a pickle may build


class UnsafePickleError(KprpeError, pickle.UnpicklingError):
    """The pickle names a global (a function or class) that the expected data never needs."""


def _latin1_encode(text, encoding="latin1"):
    # protocol <= 2 stores bytes as _codecs.encode(str, 'latin1'); allow exactly that
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a pickle")
    return text.encode("latin1")


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a pickle; only the array reconstructor accepts it (handing out the
    real class would let the pickle call it with any arguments)."""


_NDARRAY = _NdarrayToken()


def _numeric_dtype(spec, align=False, copy=False) -> np.dtype:
    if isinstance(spec, bytes) and spec.isascii():  # a Python 2 pickle read with encoding="bytes"
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise UnsafePickleError(f"refusing numpy.dtype({spec!r}): only plain dtype codes are allowed")
    dtype = np.dtype(spec)
    if dtype.kind not in NUMERIC_KINDS:
        raise UnsafePickleError(f"refusing dtype {spec!r}: only bool, integer and float arrays are allowed")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _reconstruct(cls, shape, typecode):
    # numpy's own reconstructor allocates an empty array that BUILD then fills with shape, dtype and bytes
    if cls is not _NDARRAY:
        raise UnsafePickleError("refusing to reconstruct anything but a plain numpy.ndarray")
    return np.ndarray((0,), dtype=np.uint8)


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise UnsafePickleError(f"refusing a pickled buffer of dtype {dtype!r}")
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)):
        raise UnsafePickleError(f"refusing a pickled buffer of type {type(buffer).__name__}")
    if order not in ("C", "F"):
        raise UnsafePickleError(f"refusing array order {order!r}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


_PLAIN = {("_codecs", "encode"): _latin1_encode}
_ARRAYS = {  # what a pickled plain numpy array names, under NumPy 1 and NumPy 2 module paths
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only lists, tuples, dicts, str, bytes, bool, int, float and None (and, with
    ``numpy_arrays=True``, plain numeric numpy arrays).

    ``find_class`` is the only door through which a pickle reaches code (``os.system``, ``eval``, any class);
    it opens only onto the wrapped constructors above. Persistent ids are refused as well. ``what`` names the
    expected content in the refusal message."""

    def __init__(self, file, *, numpy_arrays: bool = False, what: str | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = {**_PLAIN, **(_ARRAYS if numpy_arrays else {})}
        self._what = what or ("numeric arrays" if numpy_arrays else "plain values")

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': this file should only hold {self._what}, so it "
                "is corrupt or malicious"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a pickle")


def restricted_loads(data: bytes, *, numpy_arrays: bool = False, what: str | None = None, encoding="bytes"):
    """``pickle.loads`` through :class:`RestrictedUnpickler`; Python 2 ``str`` is read as ``bytes`` unless
    ``encoding`` says otherwise."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding=encoding, numpy_arrays=numpy_arrays, what=what)
    return unpickler.load()
