"""sd_notify: each service tells a real notification socket (a unix datagram socket this test binds,
as systemd does) that it is READY only once it serves, pings the watchdog from its loop, and says
STOPPING on SIGTERM before it exits 0.

The agent runs as the installed ``hyperback-agent`` process on libvirt's ``test:///default``
driver (no libvirtd needed); the optimizer and the media service run as their own commands.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from host_agent._proto.hyperback.v1 import media_pb2, media_pb2_grpc
from host_agent.notify import Notifier
from host_agent.storage.repository import Repository

BIN = Path(sys.executable).parent
WATCHDOG_USEC = 300_000    # pings every 0.15 s
PATIENCE = 60.0            # an upper bound on a start on a slow machine, never a wait for a duration


class NotifySocket:
    """The receiving end systemd would hold: every datagram, split into its lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[list[str]] = []

    def next(self, timeout: float = PATIENCE) -> list[str]:
        self.sock.settimeout(timeout)
        lines = self.sock.recv(4096).decode().split("\n")
        self.received.append(lines)
        return lines

    def until(self, wanted: Callable[[list[str]], bool], timeout: float = PATIENCE) -> list[str]:
        """The next datagram for which ``wanted`` holds (the ones before it are kept too)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.next(max(deadline - time.monotonic(), 0.01))
            if wanted(lines):
                return lines

    def count(self, line: str) -> int:
        return sum(lines.count(line) for lines in self.received)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


def start(command: list[str], notify: NotifySocket, log: Path) -> subprocess.Popen[bytes]:
    """The service's command, with systemd's variables; its stderr goes to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPERBACK_", "WATCHDOG_", "NOTIFY_"))}
    env.update(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    with open(log, "wb") as stderr:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def health_answers(target: str) -> bool:
    """The service's health check answers SERVING right now (no waiting for it to come up)."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5,
                                                          wait_for_ready=False)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def media_answers(target: str) -> bool:
    """The media service describes its destinations right now."""
    with grpc.insecure_channel(target) as channel:
        reply = media_pb2_grpc.MediaStub(channel).Describe(media_pb2.DescribeRequest(), timeout=5,
                                                           wait_for_ready=False)
    return [d.name for d in reply.destinations] == ["default"]


def serves_then_stops(proc: subprocess.Popen[bytes], notify: NotifySocket, answers: Callable[[str], bool],
                      log: Path) -> float:
    """When READY arrives, ``answers`` (given the READY datagram's STATUS) holds at once; two
    watchdog pings follow; SIGTERM gives STOPPING and exit 0."""
    try:
        ready = notify.until(lambda lines: "READY=1" in lines)
        ready_at = time.monotonic()
        status = next(line for line in ready if line.startswith("STATUS="))
        assert answers(status), status
        pings = notify.count("WATCHDOG=1")
        notify.until(lambda lines: "WATCHDOG=1" in lines and notify.count("WATCHDOG=1") >= pings + 2)
        proc.send_signal(signal.SIGTERM)
        notify.until(lambda lines: "STOPPING=1" in lines)
        assert proc.wait(PATIENCE) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    readies = [i for i, lines in enumerate(notify.received) if "READY=1" in lines]
    assert len(readies) == 1
    return ready_at


def test_the_agent_is_ready_only_once_its_operator_api_answers(tmp_path: Path,
                                                               notify_socket: NotifySocket) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
libvirt_uri = "test:///default"
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
restore_dir = "{tmp_path}/restores"
optimizer = "unix:{tmp_path}/optimizer.sock"
operator_listen = "unix:{tmp_path}/agent.sock"
send_load = false
metrics_listen = "127.0.0.1:0"
[repositories]
default = "{tmp_path}/repo"
""")
    started = time.monotonic()
    proc = start([str(BIN / "hyperback-agent"), "--config", str(config), "--with-optimizer"], notify_socket,
                 tmp_path / "agent.log")
    operator = f"unix:{tmp_path}/agent.sock"
    ready_at = serves_then_stops(proc, notify_socket, lambda status: health_answers(operator),
                                 tmp_path / "agent.log")
    starting = [lines for lines in notify_socket.received if any("STATUS=starting" in x for x in lines)]
    assert starting, notify_socket.received  # STATUS said what it did before READY
    print(f"agent: READY {ready_at - started:.2f} s after its start, {len(notify_socket.received)} datagrams")


def test_a_taken_metrics_port_stops_the_agent_with_one_line_and_never_ready(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    host, port = taken.getsockname()
    config = tmp_path / "agent.toml"
    config.write_text(f"""
libvirt_uri = "test:///default"
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
optimizer = "unix:{tmp_path}/optimizer.sock"
operator_listen = "unix:{tmp_path}/agent.sock"
metrics_listen = "{host}:{port}"
""")
    try:
        # the optimizer is already serving when the metrics port is found taken: it must be stopped
        proc = start([str(BIN / "hyperback-agent"), "--config", str(config), "--with-optimizer"],
                     notify_socket, tmp_path / "agent.log")
        assert proc.wait(PATIENCE) == 3
    finally:
        taken.close()
    log = (tmp_path / "agent.log").read_text()
    expected = f"hyperback-agent: error: cannot serve metrics on {host}:{port}: Address already in use"
    assert log.strip().splitlines()[-1] == expected, log
    assert "Traceback" not in log and "never awaited" not in log, log
    assert not any("READY=1" in lines for lines in notify_socket.received)


def test_the_optimizer_is_ready_once_it_serves(tmp_path: Path, notify_socket: NotifySocket) -> None:
    listen = f"unix:{tmp_path}/optimizer.sock"
    proc = start([str(BIN / "hyperback-optimizer"), "--listen", listen], notify_socket, tmp_path / "opt.log")
    serves_then_stops(proc, notify_socket, lambda status: health_answers(listen), tmp_path / "opt.log")


def test_the_media_service_is_ready_once_it_serves_and_names_its_port(tmp_path: Path,
                                                                      notify_socket: NotifySocket) -> None:
    Repository.init(tmp_path / "repo")
    proc = start([str(BIN / "hyperback-media"), "--listen", "127.0.0.1:0",
                  "--repo", f"default={tmp_path}/repo"], notify_socket, tmp_path / "media.log")

    def answers(status: str) -> bool:
        match = re.search(r"on (127\.0\.0\.1:\d+)", status)
        assert match, status
        return media_answers(match.group(1))

    serves_then_stops(proc, notify_socket, answers, tmp_path / "media.log")


def test_an_abstract_socket_address_starts_with_an_at_sign(tmp_path: Path) -> None:
    receiver = NotifySocket(f"@hyperback-test-{os.getpid()}")
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
        assert notifier.ready("up") and receiver.next(5) == ["READY=1", "STATUS=up"]
        assert notifier.stopping() and receiver.next(5) == ["STOPPING=1", "STATUS=stopping"]
        notifier.close()
    finally:
        receiver.close()


def test_the_watchdog_pings_at_half_its_period_only_for_the_process_it_names() -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval == 2.0
    assert Notifier.from_env({**mine, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval == 0.0
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 0.0  # no socket: no pings


def test_without_a_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()


def test_a_socket_nobody_listens_on_is_logged_not_raised(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.ready() is False and notifier.watchdog() is False
    notifier.close()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_a_receiver_that_never_reads_never_blocks_the_sender(tmp_path: Path) -> None:
    """A unix datagram socket blocks its sender once the receiver's queue is full; the watchdog
    pings come from the event loop, which must not stall behind a receiver that stopped reading."""
    receiver = NotifySocket(str(tmp_path / "deaf.sock"))
    notifier = Notifier(receiver.address)
    try:
        sent = [notifier.watchdog() for _ in range(5000)]  # far more than a receive queue holds
        assert sent[0] and not sent[-1]
    finally:
        notifier.close()
        receiver.close()
