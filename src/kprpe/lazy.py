"""Package attributes imported on first use (PEP 562), so that importing a package — and ``kprpe --help`` —
does not import torch and every backend. A package lists ``{public name: defining module}`` and gets the
``__getattr__`` and ``__dir__`` that load a name the first time it is read."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


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
