"""The hyperback-shim command: answers --help, prints structured results (--json), and exits with
the documented code and one clear line for every kind of failure.  The host is a fake one on a
unix socket standing in for the port (``port = unix:PATH``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shim_helpers import Background, FakeHost, ok_result

from guest_shim import protocol as p
from guest_shim.cli import EXIT_CODES, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    """main() configures the guest_shim logger: undo it."""
    yield
    logger = logging.getLogger("guest_shim")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


class HostOnSocket:
    """A fake host listening where the shim's ``port = unix:PATH`` points; ``script`` plays it."""

    def __init__(
        self, tmp_path: Path, script: Callable[[FakeHost], None], *, reply_timeout: float = 3
    ) -> None:
        self.path = tmp_path / "host.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.config = tmp_path / "shim.conf"
        self.config.write_text(
            f"[shim]\nport = unix:{self.path}\nsocket = {tmp_path / 'no-serve.sock'}\n"
            f"connect_timeout = 3\nreply_timeout = {reply_timeout}\nsysfs = {tmp_path / 'sys'}\n"
        )
        self.runner = Background(lambda: self._serve(script))

    def _serve(self, script: Callable[[FakeHost], None]) -> None:
        conn, _ = self.listener.accept()
        host = FakeHost.from_socket(conn)
        try:
            host.handshake()
            script(host)
        finally:
            host.close()
            self.listener.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("hyperback-shim: error: ")
    return lines[0]


def test_help_answers_and_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for word in ("backup", "restore", "status", "list", "serve", "exit codes"):
        assert word in out
    for n in EXIT_CODES:
        assert f"  {n} " in out
    code, out, _ = _run(capsys, "backup", "--help")
    assert code == 0 and "--destination" in out and "--no-quiesce" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("hyperback-shim 0.1.0")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["list", "--bogus"], "unrecognized arguments"),
        ([], "required"),
        (["backup", "--policy", "weekly"], "invalid choice"),
        (["backup", "hb-disk-1", "--all"], "not both"),
        (["backup", "--timeout", "-3"], "must be positive"),
        (["backup", "../../etc/shadow"], "targets[0]"),
        (["backup", "-d", "/srv"], "destination"),
        (["status", "job with spaces"], "job"),
        (["restore"], "required"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert needle in _one_line(err)
    assert out == ""


def test_bad_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[shim]\nmax_clients = lots\n")
    code, _, err = _run(capsys, "-c", str(conf), "list")
    assert code == 2 and "max_clients" in _one_line(err)


def test_backup_json_prints_the_structured_result(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def script(host: FakeHost) -> None:
        req = host.expect(p.Backup)
        assert req.targets == ("hb-disk-1",) and req.policy is p.Policy.FULL and req.quiesce is False
        host.send(p.Accepted(req.id, "job-cli"))
        host.send(ok_result(req.id, "job-cli"))

    h = HostOnSocket(tmp_path, script)
    code, out, err = _run(
        capsys, "backup", "hb-disk-1", "--policy", "full", "--no-quiesce", "--json", "-c", str(h.config)
    )
    h.runner.result()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["job"] == "job-cli" and doc["op"] == "backup"
    assert doc["disks"] == [
        {
            "serial": "hb-disk-1",
            "bytes": 1000,
            "snapshot": "snap000000000000",
            "change_detection": "dirty-bitmap",
        }
    ]
    assert err == ""  # quiet by default


def test_backup_prints_a_human_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def script(host: FakeHost) -> None:
        req = host.expect(p.Backup)
        host.send(p.Accepted(req.id, "job-h"))
        host.send(ok_result(req.id, "job-h", ("hb-disk-1", "hb-disk-2")))

    h = HostOnSocket(tmp_path, script)
    code, out, _ = _run(capsys, "-c", str(h.config), "backup")
    h.runner.result()
    assert code == 0
    assert out.splitlines()[0].startswith("job job-h: backup done in 1.2 s")
    assert "hb-disk-2  snapshot snap000000000001" in out


def test_status_and_list_print(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def script(host: FakeHost) -> None:
        req = host.expect(p.ListSnapshots)
        snap = p.SnapshotInfo("0123456789abcdef", "hb-disk-1", 1.7e9, p.Policy.FULL, 2048, "nightly")
        host.send(p.Snapshots(req.id, (snap,), False))

    h = HostOnSocket(tmp_path, script)
    code, out, _ = _run(capsys, "list", "-c", str(h.config))
    h.runner.result()
    assert code == 0
    assert out.splitlines()[0].split() == ["ID", "DISK", "CREATED", "(UTC)", "POLICY", "READ", "DESTINATION"]
    assert "0123456789abcdef  hb-disk-1  2023-11-14 22:13:20  full" in out

    def script2(host: FakeHost) -> None:
        req = host.expect(p.Status)
        host.send(p.Progress(req.id, "job-1", p.JobState.RUNNING, 512, 1024))

    second = tmp_path / "second"
    second.mkdir()
    h = HostOnSocket(second, script2)
    code, out, _ = _run(capsys, "status", "job-1", "-c", str(h.config))
    h.runner.result()
    assert code == 0 and out.strip() == "job job-1: running 50% (512 B of 1.0 KiB)"


@pytest.mark.parametrize(
    ("reply", "exit_code", "kind"),
    [
        (lambda r: p.ErrorMessage(r.id, p.ErrorCode.QUOTA, "quota of nightly exhausted"), 3, "Rejected"),
        (lambda r: p.Accepted(r.id, "job-f"), 1, "Failed"),
        (None, 5, "TimedOut"),
    ],
)
def test_failures_exit_with_their_code_and_a_json_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, reply: object, exit_code: int, kind: str
) -> None:
    def script(host: FakeHost) -> None:
        req = host.expect(p.Backup)
        if reply is None:
            host.nothing_for(1.5)  # silent
            return
        msg = reply(req)  # type: ignore[operator]
        host.send(msg)
        if isinstance(msg, p.Accepted):
            err = p.ErrorInfo(p.ErrorCode.FAILED, "cannot read hb-disk-1")
            host.send(p.Result(req.id, "job-f", p.Op.BACKUP, False, (), 0, 1.0, False, err))

    h = HostOnSocket(tmp_path, script, reply_timeout=0.5)
    code, out, err = _run(capsys, "backup", "--json", "-c", str(h.config))
    h.runner.result()
    assert code == exit_code
    _one_line(err)
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit"] == exit_code and doc["error"]["type"] == kind
    if kind == "Failed":
        assert doc["job"] == "job-f" and doc["error"]["code"] == "failed"


def test_no_host_exits_4(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = tmp_path / "shim.conf"
    conf.write_text(f"[shim]\nport = unix:{tmp_path / 'nobody.sock'}\nsocket = {tmp_path / 'x.sock'}\n")
    code, _, err = _run(capsys, "-c", str(conf), "status", "job-1")
    assert code == 4 and "nothing listens" in _one_line(err)


def test_main_called_in_process_leaves_the_signal_handlers_as_it_found_them(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A handler left behind would run in any process forked later, raising where nothing expects it.
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    conf = tmp_path / "shim.conf"
    conf.write_text(f"[shim]\nport = unix:{tmp_path / 'nobody.sock'}\nsocket = {tmp_path / 'x.sock'}\n")
    code, _, _ = _run(capsys, "-c", str(conf), "status", "job-1")
    assert code == 4
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    def script(host: FakeHost) -> None:
        req = host.expect(p.Backup)
        host.send(p.Accepted(req.id, "job-m"))
        host.send(ok_result(req.id, "job-m"))

    h = HostOnSocket(tmp_path, script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBACK_")}
    env.update(HYPERBACK_SHIM_CONFIG=str(h.config), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "guest_shim", "backup", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    h.runner.result()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["job"] == "job-m"
