"""One root exception: every error class kprpe raises on purpose derives from KprpeError (and keeps its
old base, so ``except ValueError`` callers keep working)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import kprpe
from kprpe.errors import KprpeError


def _all_modules():
    for info in pkgutil.walk_packages(kprpe.__path__, "kprpe."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_exception_class_derives_from_kprpe_error():
    found = {}
    for module in _all_modules():
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("kprpe")
            ):
                found[f"{value.__module__}.{name}"] = value
    assert len(found) >= 15
    assert not [name for name, cls in found.items() if not issubclass(cls, KprpeError)]


def test_one_landmark_file_error_and_old_bases_kept():
    from kprpe.data import LandmarkFileError as data_error
    from kprpe.eval.binfile import UnsafePickleError
    from kprpe.eval.landmarks import LandmarkFileError as eval_error
    from kprpe.face import LandmarkFileError as face_error
    from kprpe.face import MissingDependencyError

    assert data_error is eval_error is face_error
    assert issubclass(data_error, ValueError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
    assert issubclass(MissingDependencyError, ImportError)
