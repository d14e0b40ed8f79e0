"""The reference in docs/ keeps up with the command line: every command of
``blkverify`` has its page, ``docs/COMMAND.md``, and the page names every option
the command takes (both spellings, ``-U`` and ``--force-share``), as click
declares them. A new command without a page, or a new option its page does not
name, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from blkverify_rs.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMANDS = sorted(main.commands)


def option_names(command: click.Command) -> list[str]:
    """Every spelling of every option ``command`` takes (``--x/--no-x`` gives both)."""
    return [
        name
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden
        for name in (*param.opts, *param.secondary_opts)
    ]


def named(page: str, option: str) -> bool:
    """Whether ``page`` spells ``option`` as a word of its own (``-f`` is not
    found in ``-fq`` or ``--format``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page) is not None


def test_the_commands_are_the_ones_documented() -> None:
    # The tour and the index link each command's page.
    assert COMMANDS, "the blkverify group has no commands"
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"({name}.md)" in index, f"docs/README.md does not link {name}.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_the_command_page_names_every_option(name: str) -> None:
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"'blkverify {name}' has no page: write docs/{name}.md"
    text = page.read_text(encoding="utf-8")
    options = option_names(main.commands[name])
    assert options, f"'blkverify {name}' declares no options: is this the right group?"
    missing = [option for option in options if not named(text, option)]
    assert not missing, f"docs/{name}.md does not name {missing}"


def test_an_option_is_found_only_as_a_word() -> None:
    assert named("`-f/--raw-format` and `-U`", "-f")
    assert named("`-f/--raw-format`", "--raw-format")
    assert not named("`--format`, `-fq`", "-f")
    assert not named("`--max-backing-depth`", "--max-backing")
