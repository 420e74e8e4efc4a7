"""Package attributes imported on first use (PEP 562), so that importing a package — and ``kprpe --help`` —
does not import torch and every backend. A package lists ``{public name: defining module}`` and gets the
``__getattr__`` and ``__dir__`` that load a name the first time it is read."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping

__all__ = ["alias_moved_modules", "lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``exports``: public name -> module that defines it (relative to ``package``, e.g. ``".pipeline"``).
    Returns ``(__getattr__, __dir__)`` for the package's namespace."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later reads skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import <old name>`` with the module at its new name, and a DeprecationWarning. No file stays
    at the old path (so a move is a plain rename in git)."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.moved[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old name will go)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


def alias_moved_modules(moved: Mapping[str, str]) -> None:
    """Keep documented old module names importable (``{old: new}``), each with a DeprecationWarning."""
    if not any(isinstance(f, _MovedModules) and f.moved == dict(moved) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules(moved))
