"""How `make test` shares the suite out over pytest-xdist workers (``-n 2 --dist loadfile``; the hook is in
tests/conftest.py). A unit of work runs whole on one worker: a test file, so its module- and session-scoped
fixtures are built once, except the doc runner's blocks, which go one page at a time instead of all on one
worker (a page whose blocks share state runs them in order in one folder). ``--dist loadgroup`` with marks
would say the same, but with pytest 9.2 it ignores them (pytest-xdist issue 1386)."""

from __future__ import annotations

DOC_BLOCKS = "tests/docs/test_docs_run.py::test_doc_block_runs["


def unit_of_work(nodeid: str) -> str:
    if nodeid.startswith(DOC_BLOCKS):  # the test ids are "page:line"
        return "doc page " + nodeid[len(DOC_BLOCKS) :].rpartition(":")[0]
    return nodeid.split("::", 1)[0]


def make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FilesAndDocPages(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

    return FilesAndDocPages(config, log)
