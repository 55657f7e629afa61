"""Every help page renders: `embedtune --help` is the first command a new user types."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from daemon.cli import _parser


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += _command_paths(child, (*prefix, name))
    return paths


COMMANDS = _command_paths(_parser())


def test_every_subcommand_is_covered():
    assert {path[0] for path in COMMANDS if path} >= {"run", "status", "eval", "search", "config"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "top-level")
def test_help_renders(path, capsys):
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*path, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")


def test_installed_entry_point_help():
    """The console script, in a fresh process, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "eval" in done.stdout and "Traceback" not in done.stderr


def test_top_level_help_describes_the_product_to_its_users():
    """`embedtune --help` says what embedtune is, in two lines, not a developer's note on imports."""
    out = _parser().format_help()
    description = out.split("\n\n")[1]
    assert description.startswith("embedtune keeps a retrieval embedding model tuned to your own documents")
    assert len(description.strip().splitlines()) == 2, description
    assert "inbox" in description and "lazy" not in out.lower() and "import" not in out.lower()
