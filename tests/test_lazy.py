"""kprpe.lazy: names loaded on first use, and documented module paths that moved kept importable."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("kprpe.face.index", "kprpe.gallery.index"),
        ("kprpe.face.stream", "kprpe.streaming.stream"),
        ("kprpe.face.video", "kprpe.streaming.video"),
        ("kprpe.face.embed_output", "kprpe.streaming.shards"),
    ],
)
def test_a_moved_module_still_imports_with_a_deprecation_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kprpe.face.no_such_module")
    import kprpe

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        kprpe.no_such_name  # noqa: B018
