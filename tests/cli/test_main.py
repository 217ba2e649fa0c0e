"""The command as a whole: help that answers, usage errors in one line."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, run

from host_agent.cli import COMMANDS, build_parser, command_modules


def test_help_lists_every_command_and_the_exit_codes() -> None:
    out = run("--help").stdout
    for cmd in ("init", "backup", "restore", "list", "verify", "check", "prune", "demo"):
        assert cmd in out
    assert "Exit codes" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name: str) -> None:
    assert "usage: hyperback " + name in run(name, "--help").stdout


@pytest.mark.parametrize("module", sorted(set(COMMANDS.values())))
def test_each_module_registers_exactly_the_commands_the_table_sends_to_it(module: str) -> None:
    [loaded] = command_modules([next(name for name, m in COMMANDS.items() if m == module)])
    [commands] = [a for a in build_parser([loaded])._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {name for name, m in COMMANDS.items() if m == module}


def test_the_command_is_the_first_word_after_the_options_and_none_or_an_unknown_one_loads_all() -> None:
    assert [m.__name__ for m in command_modules(["-v", "-v", "list", "--repo", "backup"])] == \
        ["host_agent.cli.list_cmd"]
    everything = len(set(COMMANDS.values()))
    assert len(command_modules(["-v", "--help"])) == len(command_modules(["frobnicate"])) == everything


def test_a_repository_command_starts_without_grpc_cryptography_or_libvirt() -> None:
    """A call imports only its command's module: the others' imports were most of its start-up."""
    probe = ("import sys; from host_agent.cli import main\n"
             "assert main(['list', '--repo', sys.argv[1]]) == 2\n"
             "print(' '.join(m for m in ('grpc', 'cryptography', 'libvirt') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe, "/nonexistent/repo"], capture_output=True, text=True,
                          check=True)
    assert "is not a hyperback repository" in proc.stderr
    assert proc.stdout.strip() == ""


def test_unknown_command_and_missing_arguments_are_usage_errors() -> None:
    assert_one_line_error(run("frobnicate", check=False), 2, "invalid choice", "'restore-vm'", "'certs'")
    assert_one_line_error(run("backup", check=False), 2, "required")
