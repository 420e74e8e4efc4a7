"""The root of every error kprpe raises on purpose. The CLI catches ``KprpeError`` once and prints it as one
line
(``kprpe <command>: error: <message>``) with exit status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class KprpeError(Exception):
    """Base class of every user-facing kprpe error (bad input, bad file, bad configuration)."""


class CommandError(KprpeError):
    """A command-line failure that is not tied to one file format (bad option combination, missing input)."""
