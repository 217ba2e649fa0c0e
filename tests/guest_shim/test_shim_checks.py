"""The host's ``check``: "are you there" is always answered; a command runs only when the guest
listed it in ``check_commands``, without a shell, bounded in time and output; serve answers it
while it keeps serving freeze and thaw."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_helpers import FAST, Background, FakeHost, socketpair_port, wait_until

from guest_shim import protocol as p
from guest_shim.checks import Checker, output_text
from guest_shim.config import parse_config
from guest_shim.errors import ConfigError
from guest_shim.serve import PortState, Server


def run_check(checker: Checker, msg: p.Check) -> p.Checked:
    """The reply to ``msg``, waiting for a command's notice (the checker's notify sets an event)."""
    done = threading.Event()
    checker.notify = done.set
    reply = checker.handle(msg)
    if reply is None:
        assert done.wait(30), "no reply from the check"
        (reply,) = checker.take_notices()
    assert isinstance(reply, p.Checked), reply
    return reply


def test_a_check_without_command_is_answered_at_once() -> None:
    assert Checker().handle(p.Check("c", 5)) == p.Checked("c", True)


def test_a_command_the_guest_did_not_allow_is_refused_naming_the_setting() -> None:
    reply = Checker([("true",)]).handle(p.Check("c", 5, ("rm", "-rf", "/")))
    assert isinstance(reply, p.ErrorMessage) and reply.code is p.ErrorCode.UNSUPPORTED
    assert "check_commands" in reply.message


def test_an_allowed_command_runs_without_a_shell_and_reports_status_and_output() -> None:
    command = ("sh", "-c", "echo first; printf 'second\\tline\\n' >&2; exit 3")
    reply = run_check(Checker([command]), p.Check(7, 5, command))
    assert (reply.id, reply.ok, reply.exit) == (7, False, 3)
    assert reply.output == "first | second?line"
    ok = run_check(Checker([("true",)]), p.Check(8, 5, ("true",)))
    assert (ok.ok, ok.exit, ok.output) == (True, 0, "")


def test_a_command_past_its_timeout_is_killed_and_reported() -> None:
    command = ("sleep", "60")
    reply = run_check(Checker([command]), p.Check("slow", 0.3, command))
    assert not reply.ok and reply.exit is None and reply.output.startswith("killed after 0.3 s")
    assert reply.seconds < 30


def test_a_missing_program_is_a_failed_check_not_a_crash() -> None:
    command = ("/nonexistent/health",)
    reply = run_check(Checker([command]), p.Check("m", 5, command))
    assert not reply.ok and "cannot start /nonexistent/health" in reply.output


def test_output_keeps_the_end_and_is_wire_text() -> None:
    text = output_text(b"\x1b[31mred\x1b[0m\n" + b"x" * 10000 + b"\nthe end\n")
    assert len(text) == p.MAX_CHECK_OUTPUT and text.startswith("...") and text.endswith("the end")
    p.Checked("i", True, 0, text)  # valid on the wire


def test_check_commands_are_parsed_one_a_line_as_shell_words() -> None:
    cfg = parse_config("[shim]\ncheck_commands = systemctl is-system-running\n"
                       "    /usr/local/bin/app-health --url 'http://localhost/ok'\n")
    assert cfg.check_commands == (("systemctl", "is-system-running"),
                                  ("/usr/local/bin/app-health", "--url", "http://localhost/ok"))
    assert parse_config("").check_commands == ()
    with pytest.raises(ConfigError, match="check_commands"):
        parse_config("[shim]\ncheck_commands = echo 'unclosed\n")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, FakeHost]]:
    port, host = socketpair_port()
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"),
                              check_commands=(("sh", "-c", "echo healthy"), ("sleep", "2")))
    ports = [port]
    server = Server(cfg, opener=lambda: ports.pop())
    runner = Background(server.serve_forever)
    host.handshake(p.Role.SERVE)
    wait_until(lambda: server.state is PortState.READY, what="serve ready")
    yield server, host
    server.stop()
    runner.result()
    host.close()


def test_serve_answers_checks_and_keeps_serving_while_a_command_runs(served: tuple[Server, FakeHost]) -> None:
    _, host = served
    host.send(p.Check("alive", 5))
    assert host.expect(p.Checked) == p.Checked("alive", True)
    host.send(p.Check("slow", 10, ("sleep", "2")))
    host.send(p.Check("second", 10, ("sh", "-c", "echo healthy")))
    busy = host.expect(p.ErrorMessage)
    assert (busy.id, busy.code) == ("second", p.ErrorCode.BUSY)
    host.send(p.Freeze("fz", "job-1", ("hb-disk-1",), 5))  # answered while the command runs
    assert host.expect(p.Frozen).id == "fz"
    host.send(p.Thaw("th", "job-1"))
    assert host.expect(p.Thawed).id == "th"
    assert host.expect(p.Checked, timeout=30).id == "slow"
    host.send(p.Check("again", 10, ("sh", "-c", "echo healthy")))
    reply = host.expect(p.Checked)
    assert (reply.id, reply.ok, reply.exit, reply.output) == ("again", True, 0, "healthy")
