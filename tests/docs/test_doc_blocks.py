"""The doc runner's own machinery: extraction, the table's rules, failure messages (no model runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from docs.doc_blocks import (
    REPO,
    SHARED_MARKER,
    Entry,
    PythonSession,
    all_blocks,
    console_commands,
    entry_for,
    extract_blocks,
    failure_message,
    run_bash,
    runnable_text,
)

PAGE = """# A page

```bash
kprpe align photos/ -o aligned/   # comment
kprpe serve --weights W
```

text

1. a list item:
   ```python
   print("indented")
   ```

```yaml
not: run
```

```console
$ kprpe models --zoo \\
    --json
{"table": "output, not run"}
$ echo two
two
```
"""


def _page(tmp_path: Path, text: str = PAGE) -> Path:
    (tmp_path / "docs").mkdir(exist_ok=True)
    path = tmp_path / "docs" / "page.md"
    path.write_text(text)
    return path


def test_blocks_with_their_line_language_and_dedented_text(tmp_path):
    blocks = extract_blocks(_page(tmp_path), repo=tmp_path)
    assert [(b.id, b.language) for b in blocks] == [
        ("docs/page.md:3", "bash"),
        ("docs/page.md:11", "python"),
        ("docs/page.md:19", "console"),
    ]
    assert blocks[1].text == 'print("indented")\n' and not blocks[0].shared
    assert console_commands(blocks[2].text) == "kprpe models --zoo \\\n    --json\necho two\n"
    assert extract_blocks(_page(tmp_path, SHARED_MARKER + "\n" + PAGE), repo=tmp_path)[0].shared


def test_an_unclosed_fence_names_the_page_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"docs/page.md:3: code fence never closed"):
        extract_blocks(_page(tmp_path, "# x\n\n```bash\nkprpe models\n"), repo=tmp_path)


def test_substitutions_omissions_and_replacements_apply_in_order(tmp_path):
    block = extract_blocks(_page(tmp_path), repo=tmp_path)[0]
    entry = Entry(
        "docs/page.md", "kprpe serve", omit={"kprpe serve": "serves forever"}, replace={"-o": "--output"}
    )
    text = runnable_text(block, entry, [(r"photos/", "pics/", "a stand-in")])
    assert text == "kprpe align pics/ --output aligned/   # comment\n"


def test_a_stale_table_entry_fails_loudly(tmp_path):
    block = extract_blocks(_page(tmp_path), repo=tmp_path)[0]
    with pytest.raises(AssertionError, match="omits lines starting"):
        runnable_text(block, Entry("docs/page.md", "kprpe", omit={"kprpe embed": "x"}), [])
    with pytest.raises(AssertionError, match="no longer contains"):
        runnable_text(block, Entry("docs/page.md", "kprpe", replace={"--nothing": "x"}), [])
    two = [Entry("docs/page.md", "kprpe align"), Entry("docs/page.md", "kprpe serve")]
    with pytest.raises(ValueError, match="2 table entries match"):
        entry_for(block, two)


def test_a_failing_block_names_itself_its_command_and_output_tail(tmp_path):
    page = _page(tmp_path, "```bash\necho started\necho 'something broke' >&2\nexit 3\necho never\n```\n")
    block = extract_blocks(page, repo=tmp_path)[0]
    text = runnable_text(block, None, [])
    outcome = run_bash(text, tmp_path, timeout=60)
    assert outcome.returncode == 3 and "never" not in outcome.output
    message = failure_message(block, text, outcome)
    assert message.startswith("doc block docs/page.md:1 (bash) exited 3")
    assert "exit 3" in message and "started\nsomething broke" in message and "doc_table.py" in message


def test_a_failing_command_stops_the_block(tmp_path):
    outcome = run_bash("false | cat\necho after\n", tmp_path, timeout=60)
    assert outcome.returncode != 0 and "after" not in outcome.output


def test_shared_python_blocks_keep_their_names_and_report_errors(tmp_path):
    session = PythonSession(tmp_path)
    try:
        assert session.run("x = 41\n").returncode == 0
        shown = session.run("print(x + 1)\n")
        assert (shown.returncode, shown.output.strip()) == (0, "42")
        failed = session.run("undefined_name\n")
        assert failed.returncode == 1 and "NameError" in failed.output
        assert session.run("print(x)\n").output.strip() == "41"  # an error does not lose the page's state
    finally:
        session.close()


def test_make_test_gives_each_page_of_blocks_to_one_worker():
    """Under xdist (make test) a page's blocks are one unit of work (a shared page runs them in order in one
    folder), each page its own unit so the pages spread over the workers; other tests go by file."""
    import docs.test_docs_run as runner
    from xdist_units import DOC_BLOCKS, unit_of_work

    test_file = Path(runner.__file__).relative_to(REPO).as_posix()
    assert DOC_BLOCKS == f"{test_file}::{runner.test_doc_block_runs.__name__}["
    pages_of_unit: dict[str, set[str]] = {}
    for block in all_blocks():
        pages_of_unit.setdefault(unit_of_work(f"{DOC_BLOCKS}{block.id}]"), set()).add(block.page)
    assert all(len(pages) == 1 for pages in pages_of_unit.values())
    assert len(pages_of_unit) == len({block.page for block in all_blocks()}) > 5
    assert unit_of_work("tests/face/test_pipeline.py::test_a[x:1]") == "tests/face/test_pipeline.py"
