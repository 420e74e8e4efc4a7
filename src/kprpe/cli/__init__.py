"""The ``kprpe`` command line: :mod:`.main` wires the command groups together, :mod:`.options` holds the
options several commands share, and each other module is one command group (``register(subparsers)``)."""

from __future__ import annotations

from .main import COMMAND_MODULES, build_parser, main

__all__ = ["COMMAND_MODULES", "build_parser", "main"]
