"""Every fenced bash / console / python block of README.md and docs/*.md runs here (issue 31).

Test ids are "page:line". How a block runs (substitutions, what cannot run here and why, output checks,
pictures) is declared in tests/docs/doc_table.py; a block with no entry runs as written. A page with
``<!-- doc-runner: blocks share state -->`` runs its blocks in order in one folder and one interpreter.
``KPRPE_DOC_PICTURES=update`` writes the pictures the blocks make over the committed ones.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from docs.doc_blocks import (
    REPO,
    Block,
    Outcome,
    PythonSession,
    all_blocks,
    entry_for,
    failure_message,
    run_bash,
    run_python,
    runnable_text,
)
from docs.doc_table import ENTRIES, SUBSTITUTIONS, build_workspace

BLOCKS = all_blocks()


def _param(block: Block):
    entry = entry_for(block, ENTRIES)
    marks = [pytest.mark.slow] if entry is not None and entry.slow else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    pytest.importorskip("skimage")
    return build_workspace(tmp_path_factory.mktemp("doc_workspace") / "ws")


class _Pages:
    """Shared pages: one folder and one interpreter per page; blocks run in page order, each once."""

    def __init__(self, workspace: Path, root: Path):
        self.workspace, self.root = workspace, root
        self.folders: dict[str, Path] = {}
        self.sessions: dict[str, PythonSession] = {}
        self.done: dict[str, dict[int, Outcome]] = {}

    def folder(self, page: str) -> Path:
        if page not in self.folders:
            self.folders[page] = _copy_workspace(self.workspace, self.root / page.replace("/", "_"))
        return self.folders[page]

    def run(self, block: Block) -> tuple[Path, str, Outcome]:
        done = self.done.setdefault(block.page, {})
        for earlier in [b for b in BLOCKS if b.page == block.page and b.line < block.line]:
            if earlier.line not in done:  # a block picked alone with -k still finds its page's state
                done[earlier.line] = self._run_one(earlier)[1]
        text, outcome = self._run_one(block)
        done[block.line] = outcome
        return self.folder(block.page), text, outcome

    def _run_one(self, block: Block) -> tuple[str, Outcome]:
        entry = entry_for(block, ENTRIES)
        if entry is not None and entry.skip:
            return "", Outcome(0, "")
        text = runnable_text(block, entry, SUBSTITUTIONS)
        timeout = entry.timeout if entry else 900.0
        if block.language == "python":
            if block.page not in self.sessions:
                self.sessions[block.page] = PythonSession(self.folder(block.page))
            return text, self.sessions[block.page].run(text)
        return text, run_bash(text, self.folder(block.page), timeout)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()


@pytest.fixture(scope="session")
def shared_pages(workspace, tmp_path_factory):
    pages = _Pages(workspace, tmp_path_factory.mktemp("doc_pages"))
    yield pages
    pages.close()


def _copy_workspace(workspace: Path, folder: Path) -> Path:
    shutil.copytree(workspace, folder, symlinks=True)
    return folder


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_block_runs(block: Block, workspace: Path, shared_pages: _Pages, tmp_path: Path):
    entry = entry_for(block, ENTRIES)
    if entry is not None and entry.skip:
        pytest.skip(f"declared in tests/docs/doc_table.py: {entry.skip}")
    if block.shared:
        folder, text, outcome = shared_pages.run(block)
    else:
        folder = _copy_workspace(workspace, tmp_path / "ws")
        text = runnable_text(block, entry, SUBSTITUTIONS)
        timeout = entry.timeout if entry else 900.0
        run = run_python if block.language == "python" else run_bash
        outcome = run(text, folder, timeout)
    assert outcome.returncode == 0, failure_message(block, text, outcome)
    try:
        if entry is not None and entry.check is not None:
            entry.check(outcome.output, folder, text)
        for picture in entry.pictures if entry is not None else ():
            _compare_picture(folder / picture, REPO / picture)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{failure_message(block, text, outcome)}") from None


def _compare_picture(made: Path, committed: Path) -> None:
    """The committed picture is the one the documented command makes (same size, nearly the same pixels:
    anti-aliased lines may move by a pixel where float rounding differs between CPUs)."""
    from PIL import Image

    assert made.is_file(), f"the block did not write {made.name}"
    if os.environ.get("KPRPE_DOC_PICTURES") == "update":
        shutil.copyfile(made, committed)
    assert committed.is_file(), f"{committed.relative_to(REPO)} is not committed (KPRPE_DOC_PICTURES=update)"
    new = np.asarray(Image.open(made).convert("RGB"), dtype=np.int16)
    old = np.asarray(Image.open(committed).convert("RGB"), dtype=np.int16)
    assert new.shape == old.shape, f"{committed.name}: the command makes {new.shape}, committed {old.shape}"
    changed = np.abs(new - old).max(axis=2) > 32
    assert changed.mean() < 0.01, (
        f"{committed.relative_to(REPO)} differs from what its command makes now in {changed.mean():.1%} of "
        "the pixels: regenerate it (KPRPE_DOC_PICTURES=update)"
    )


def test_every_table_entry_names_one_block():
    """A stale entry (its block edited away) or one matching two blocks fails here, not silently."""
    for entry in ENTRIES:
        found = [b.id for b in BLOCKS if entry.matches(b)]
        assert len(found) == entry.blocks, (
            f"table entry {entry.page!r} / {entry.contains!r} matches {found or 'no block'}"
        )
