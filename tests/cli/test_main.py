"""The command as a whole: help that answers, usage errors in one line."""
from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error, run

from host_agent.cli import COMMANDS


def test_help_lists_every_command_and_the_exit_codes() -> None:
    out = run("--help").stdout
    for cmd in ("init", "backup", "restore", "list", "verify", "check", "prune", "demo"):
        assert cmd in out
    assert "Exit codes" in out


@pytest.mark.parametrize("module", COMMANDS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_subcommand_has_help(module: object) -> None:
    name = module.__name__.rsplit(".", 1)[1].removesuffix("_cmd").replace("_", "-")  # type: ignore[attr-defined]
    assert "usage: hyperback " + name in run(name, "--help").stdout


def test_unknown_command_and_missing_arguments_are_usage_errors() -> None:
    assert_one_line_error(run("frobnicate", check=False), 2, "invalid choice")
    assert_one_line_error(run("backup", check=False), 2, "required")
