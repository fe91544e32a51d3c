"""mkdocs hook: writes docs/cli.md from `rabbitflow.cli.main.parser()` before each build.

The page is committed (it reads on GitHub too); `tests/test_docs.py` checks it is current.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's CLI, whichever rabbitflow the venv has installed

from rabbitflow.cli.main import parser  # noqa: E402

PAGE = ROOT / "docs" / "cli.md"
WIDTH = 100

HEADER = """\
# Command line reference

Generated from `rabbitflow.cli.main.parser()` by `docs/hooks/cli_reference.py` on every `make docs`;
do not edit by hand. `rabbitflow COMMAND --help` prints the same text.

`MODULE:APP` names the service everywhere: a module path (`orders.service`, imported from the
current directory) or a file path (`service.py`, `src/orders/service.py`), a colon, and the name
of the `App` variable in it. `:app` may be left out.
"""


def _commands(
    command: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """Every command and subcommand, depth first, with the one-line help its parent gives it."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub, helps.get(name, "")
                yield from _commands(sub, f"{path} {name}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _argument_rows(command: argparse.ArgumentParser) -> list[str]:
    formatter = command._get_formatter()
    rows = []
    for action in command._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, argparse._SubParsersAction | argparse._HelpAction
        ):
            continue
        if action.option_strings:
            metavar = formatter._format_args(action, action.dest.upper()) if action.nargs != 0 else ""
            name = ", ".join(
                f"`{option}{' ' + metavar if metavar else ''}`" for option in action.option_strings
            )
        else:
            name = f"`{action.metavar or action.dest}`"
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append(f"| {name} | {_cell(help_text)} |")
    return rows


def _usage(command: argparse.ArgumentParser) -> str:
    command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)
    return command.format_usage().removeprefix("usage: ").strip()


def render() -> str:
    """The page, from the parser as it is now, wrapped as on a 100-column terminal whatever
    this one is (argparse reads COLUMNS when it builds a subcommand's prog)."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        top = parser()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    top.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)
    parts = [HEADER, "## rabbitflow", "", top.description or "", "", "```text", _usage(top), "```", ""]
    parts += ["| argument | meaning |", "| --- | --- |", *_argument_rows(top), ""]
    parts += ["`-h` / `--help` on any command prints its help.", ""]
    for path, command, summary in _commands(top, "rabbitflow"):
        depth = path.count(" ") + 1
        parts += [f"{'#' * min(depth, 4)} {path}", ""]
        description = command.description or summary
        if description:
            parts += [description, ""]
        parts += ["```text", _usage(command), "```", ""]
        rows = _argument_rows(command)
        if rows:
            parts += ["| argument | meaning |", "| --- | --- |", *rows, ""]
        if any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
            parts += ["Its actions follow.", ""]
    return "\n".join(parts).rstrip() + "\n"


def on_pre_build(config: Any, **kwargs: Any) -> None:
    text = render()
    if not PAGE.exists() or PAGE.read_text() != text:  # unchanged: no rewrite, no serve reload loop
        PAGE.write_text(text)
