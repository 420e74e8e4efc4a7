"""The doc runner's machinery: find the fenced code blocks of README.md and docs/*.md, run them.

What to substitute, what to leave out and what to check lives in one table, ``doc_table.py``; this module only
extracts blocks, applies a table entry and runs the result, with failure messages that name the block
("docs/face.md:173"), the command and the tail of its output, so drift is quick to fix.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_LANGUAGES = {"bash", "sh", "console", "python"}
# A page whose blocks run one after another in one folder (and whose Python blocks share one interpreter)
# says so with this HTML comment (invisible when rendered); every other block runs alone.
SHARED_MARKER = "<!-- doc-runner: blocks share state -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository: "docs/face.md"
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    shared: bool  # the page's blocks share a folder and an interpreter

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def extract_blocks(path: Path, repo: Path = REPO) -> list[Block]:
    """Every fenced bash / sh / console / python block of one Markdown page, indentation removed."""
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(repo).as_posix()
    shared = SHARED_MARKER in text
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language, start = match["fence"], match["lang"].lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: code fence never closed")
        i += 1
        if language in RUN_LANGUAGES:
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(page, start + 1, "bash" if language == "sh" else language, code, shared))
    return blocks


def all_blocks(repo: Path = REPO) -> list[Block]:
    return [block for page in doc_pages(repo) for block in extract_blocks(page, repo)]


def console_commands(text: str) -> str:
    """A ``console`` block's commands: lines after ``$ `` (continued by a trailing backslash); no output."""
    commands, continuing = [], False
    for line in text.splitlines():
        if continuing or line.startswith("$ "):
            commands.append(line if continuing else line[2:])
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


@dataclass(frozen=True)
class Entry:
    """One row of the table: which block (page + a text it contains) and how it runs.

    ``skip``: the block cannot run here, and why. ``omit``: {line start: why} lines left out of a block that
    otherwise runs. ``replace``: {text: replacement} for this block only (after the global substitutions).
    ``slow``: marked ``@pytest.mark.slow``. ``check(output, folder, text)``: asserts what the doc shows of
    the output.
    ``pictures``: files the block writes that are committed at the same paths (the runner compares them).
    """

    page: str
    contains: str
    skip: str | None = None
    omit: dict[str, str] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)
    slow: bool = False
    check: Callable[[str, Path, str], None] | None = None
    pictures: tuple[str, ...] = ()
    timeout: float = 900.0  # seconds; the shared machine runs 5-10x slower under load
    blocks: int = 1  # how many blocks the entry names (a page may repeat a block word for word)

    def matches(self, block: Block) -> bool:
        return block.page == self.page and self.contains in block.text


def entry_for(block: Block, entries: list[Entry]) -> Entry | None:
    found = [entry for entry in entries if entry.matches(block)]
    if len(found) > 1:
        raise ValueError(
            f"{block.id}: {len(found)} table entries match it: " + ", ".join(e.contains for e in found)
        )
    return found[0] if found else None


def runnable_text(block: Block, entry: Entry | None, substitutions: list[tuple[str, str, str]]) -> str:
    """The block as it runs: console output dropped, omitted lines removed, substitutions applied."""
    text = console_commands(block.text) if block.language == "console" else block.text
    if entry is not None:
        text = _omit_lines(text, entry.omit, block)
    for pattern, replacement, _why in substitutions:
        text = re.sub(pattern, replacement, text)
    if entry is not None:
        for old, new in entry.replace.items():
            if old not in text:
                raise AssertionError(
                    f"{block.id}: the table replaces {old!r}, which the block no longer contains"
                )
            text = text.replace(old, new)
    return text


def _omit_lines(text: str, omit: dict[str, str], block: Block) -> str:
    lines, kept, used = text.splitlines(), [], set()
    i = 0
    while i < len(lines):
        start = next((s for s in omit if lines[i].lstrip().startswith(s)), None)
        if start is None:
            kept.append(lines[i])
            i += 1
            continue
        used.add(start)
        while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):  # a continued command goes whole
            i += 1
        i += 1
    missing = set(omit) - used
    if missing:
        raise AssertionError(
            f"{block.id}: the table omits lines starting {sorted(missing)}, not in the block"
        )
    return "\n".join(kept) + "\n"


def tool_environment(folder: Path) -> dict[str, str]:
    """The environment blocks run in: this checkout's package, one thread, offline, Agg plots."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        KPRPE_DOC_PYTHON=sys.executable,
        HOME=str(folder / ".home"),  # nothing a block writes lands in the developer's home
    )
    return env


# `kprpe`, `python` and `python3` in a bash block mean this interpreter with this checkout's package.
BASH_PRELUDE = """set -eo pipefail
kprpe() { "$KPRPE_DOC_PYTHON" -m kprpe "$@"; }
python() { "$KPRPE_DOC_PYTHON" "$@"; }
python3() { "$KPRPE_DOC_PYTHON" "$@"; }
"""


@dataclass
class Outcome:
    returncode: int
    output: str  # stdout and stderr together, in order


def run_bash(text: str, folder: Path, timeout: float) -> Outcome:
    return _run(["bash", "-c", BASH_PRELUDE + text], folder, timeout)


def run_python(text: str, folder: Path, timeout: float) -> Outcome:
    return _run([sys.executable, "-c", text], folder, timeout)


def _run(argv: list[str], folder: Path, timeout: float) -> Outcome:
    try:
        done = subprocess.run(
            argv,
            cwd=folder,
            env=tool_environment(folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Outcome(124, out + f"\n[doc runner: killed after {timeout:.0f} s]")
    return Outcome(done.returncode, done.stdout)


class PythonSession:
    """One interpreter for a page whose blocks share state: blocks are sent one at a time and run in order."""

    _SERVER = textwrap.dedent(
        """
        import sys, traceback
        scope = {"__name__": "__main__"}
        while True:
            size = sys.stdin.readline()
            if not size:
                break
            code = sys.stdin.read(int(size))
            try:
                exec(compile(code, "<doc block>", "exec"), scope)
                status = "ok"
            except BaseException:
                traceback.print_exc()
                status = "failed"
            sys.stdout.flush(); sys.stderr.flush()
            print("\\n@@doc-block-" + status, flush=True)
        """
    )

    def __init__(self, folder: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", self._SERVER],
            cwd=folder,
            env=tool_environment(folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, text: str) -> Outcome:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{len(text)}\n{text}")
        self.process.stdin.flush()
        lines = []
        for line in self.process.stdout:
            if line.startswith("@@doc-block-"):
                return Outcome(0 if line.strip().endswith("ok") else 1, "".join(lines))
            lines.append(line)
        return Outcome(self.process.wait(), "".join(lines) + "\n[doc runner: the interpreter exited]")

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def failure_message(block: Block, text: str, outcome: Outcome, tail: int = 3000) -> str:
    """Which block, what ran, its exit status and the end of its output."""
    shown = outcome.output if len(outcome.output) <= tail else "..." + outcome.output[-tail:]
    return (
        f"doc block {block.id} ({block.language}) exited {outcome.returncode}\n"
        f"--- what ran (after the table's substitutions) ---\n{text.rstrip()}\n"
        f"--- output tail ---\n{shown.rstrip()}\n"
        f"(declare it in tests/docs/doc_table.py if it cannot run here, with the reason)"
    )
