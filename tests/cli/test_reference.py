"""docs/cli.md's command reference is the parsers' own description: a renamed option, a new command or a new
default that is not on the page fails here (regenerate with ``python -m kprpe.cli.reference --write
docs/cli.md``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprpe.cli.reference import BEGIN, END, command_table, generated_block, rewrite

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_the_page_lists_every_command_and_option_as_the_parsers_define_them():
    page = PAGE.read_text(encoding="utf-8")
    generated = page[page.index(BEGIN) : page.index(END) + len(END)]
    assert generated == generated_block(), (
        "docs/cli.md's reference differs from the parsers: run `python -m kprpe.cli.reference --write "
        "docs/cli.md` and review the diff"
    )


def test_the_table_changes_when_a_parser_does():
    import argparse

    from kprpe.cli import build_parser

    parser = build_parser()
    before = command_table(parser)
    verify = parser._subparsers._group_actions[0].choices["verify"]
    verify.add_argument("--brand-new", default=3)
    after = command_table(parser)
    assert before != after and "`--brand-new BRAND_NEW` (3)" in after
    assert isinstance(verify, argparse.ArgumentParser)


def test_rewrite_replaces_only_the_generated_part():
    page = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert rewrite(page, f"{BEGIN}\nnew\n{END}") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError):
        rewrite("no markers", "x")
