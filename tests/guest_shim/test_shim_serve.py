"""serve mode over a real unix socket, with a socketpair or a unix socket standing in for the
port: multiplexing with id rewriting, freeze answered by serve, host loss and resync, bounds."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shim_helpers import FAST, Background, FakeHost, ok_result, socketpair_port, wait_until

from guest_shim import protocol as p
from guest_shim.client import Client, backup, status
from guest_shim.config import ShimConfig
from guest_shim.errors import ConfigError, HostNotConnected, Rejected
from guest_shim.port import Port
from guest_shim.serve import MAX_PENDING, PortState, Server


def _once(port: Port) -> Callable[[], Port]:
    ports = [port]

    def opener() -> Port:
        if not ports:
            raise HostNotConnected("stand-in port is gone")
        return ports.pop()

    return opener


class Served:
    def __init__(self, config: ShimConfig, opener: Callable[[], Port]) -> None:
        self.config = config
        self.server = Server(config, opener=opener)
        self.runner = Background(self.server.serve_forever)
        wait_until(lambda: self.server.ready or self.runner.done(), what="serve listening")
        assert self.server.ready

    def stop(self) -> None:
        self.server.stop()
        self.runner.result()

    def raw_app(self) -> FakeAppSocket:
        return FakeAppSocket(self.config.socket)


class FakeAppSocket:
    """A local application speaking the protocol by hand (to test what the library never sends)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.peer = FakeHost.from_socket(self.sock)  # reads what serve sends; any direction
        self.peer.reader = p.MessageReader(p.Direction.TO_GUEST)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.peer.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, FakeHost]]:
    port, host = socketpair_port()
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"))
    s = Served(cfg, _once(port))
    host.handshake(p.Role.SERVE)
    wait_until(lambda: s.server.state is PortState.READY, what="serve ready")
    yield s, host
    s.stop()
    host.close()


def test_two_clients_through_serve_get_their_own_replies(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    progress: list[object] = []
    first = Background(lambda: backup(["hb-disk-1"], config=s.config, on_progress=progress.append))
    second = Background(lambda: backup(["hb-disk-2"], config=s.config))
    reqs = {r.targets: r for r in (host.expect(p.Backup), host.expect(p.Backup))}
    one, two = reqs[("hb-disk-1",)], reqs[("hb-disk-2",)]
    assert one.id != two.id
    assert all(str(r.id).startswith(s.server._prefix) for r in (one, two))  # serve's own ids
    host.send(p.Accepted(two.id, "job-2"))
    host.send(p.Accepted(one.id, "job-1"))
    host.send(p.Progress(None, "job-1", p.JobState.RUNNING, 5, 10))
    host.send(ok_result(two.id, "job-2", ("hb-disk-2",)))
    host.send(ok_result(None, "job-1", ("hb-disk-1",)))  # by job: routed to the first application
    r1, r2 = first.result(), second.result()
    assert (r1.job, r1.disks[0].serial) == ("job-1", "hb-disk-1")
    assert (r2.job, r2.disks[0].serial) == ("job-2", "hb-disk-2")
    assert len(progress) == 1
    assert s.server._routes == {} and s.server._jobs == {}


def test_serve_answers_freeze_itself_and_applications_never_see_it(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    call = Background(lambda: backup(["hb-disk-1"], config=s.config))
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-f"))
    host.send(p.Freeze("fz", "job-f", ("hb-disk-1",), 5))
    frozen = host.expect(p.Frozen)
    assert frozen.id == "fz" and frozen.skipped[0].reason is p.SkipReason.UNKNOWN_DISK
    host.send(p.Thaw("th", "job-f"))
    assert host.expect(p.Thawed).by is p.ThawCause.HOST
    host.send(ok_result(req.id, "job-f"))
    assert call.result().job == "job-f"


def test_host_going_away_mid_job_is_reported_to_the_application(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    call = Background(lambda: backup("all", config=s.config))
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-x"))
    host.close()
    with pytest.raises(HostNotConnected) as info:
        call.result()
    assert info.value.job == "job-x"
    wait_until(lambda: s.server.state is PortState.CLOSED, what="port closed")
    with pytest.raises(HostNotConnected, match="not connected"):
        status("job-x", config=s.config)


def test_serve_reconnects_and_resyncs_when_the_host_comes_back(tmp_path: Path) -> None:
    host_path = str(tmp_path / "host.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(host_path)
    listener.listen(1)
    listener.settimeout(10)
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"))
    s = Served(cfg, lambda: Port.connect_unix(host_path) or _never())
    try:
        conn1, _ = listener.accept()
        host1 = FakeHost.from_socket(conn1)
        first_sync = host1.handshake(p.Role.SERVE)
        host1.close()  # the host agent restarts
        conn2, _ = listener.accept()  # serve comes back by itself
        host2 = FakeHost.from_socket(conn2)
        second_sync = host2.expect(p.Sync)
        assert second_sync.id != first_sync.id
        host2.send(p.Accepted("stale-1", "job-old"))  # stale: dropped (sync not yet acked)
        host2.send_raw(p.sync_ack_frame(second_sync.id))
        host2.expect(p.Hello)
        call = Background(lambda: status("job-1", config=cfg))
        req = host2.expect(p.Status)
        host2.send(p.Progress(req.id, "job-1", p.JobState.RUNNING, 3, 4))
        assert call.result().done == 3
        host2.close()
    finally:
        s.stop()
        listener.close()


def _never() -> Port:
    raise HostNotConnected("nobody listens")


def test_requests_while_the_host_is_absent_get_not_connected(tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"))
    s = Served(cfg, _never)
    try:
        with pytest.raises(HostNotConnected, match="not connected"):
            backup("all", config=cfg)
    finally:
        s.stop()


def test_applications_cannot_send_host_side_messages_or_garbage(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    app = s.raw_app()
    app.send_raw(p.sync_frame(99))
    assert app.peer.expect(p.SyncAck).id == 99
    assert app.peer.raw.startswith(p.RESET)  # serve answers like a host: 0xFF, then the ack
    app.send_raw(p.encode(p.Frozen("f", "j", (), ())))
    assert app.peer.expect(p.ErrorMessage).code is p.ErrorCode.BAD_REQUEST
    app.send_raw(b'{"v":1,"type":"backup","id":"b1","targets":"all","policy":"sometimes"}\n')
    err = app.peer.expect(p.ErrorMessage)
    assert err.id == "b1" and "policy" in err.message
    app.send_raw(b'{"v":1,"type":"freeze","id":"f1","job":"j","disks":["d"],"timeout":1}\n')
    assert app.peer.expect(p.ErrorMessage).id == "f1"
    app.send_raw(b"y" * (p.MAX_FRAME + 10) + b"\n")
    assert "too long" in app.peer.expect(p.ErrorMessage).message
    assert host.nothing_for(0.2)  # none of it reached the host
    app.close()


def test_outstanding_requests_per_application_are_bounded(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    app = s.raw_app()
    for i in range(MAX_PENDING + 1):
        app.send_raw(p.encode(p.Status(i, "job")))
    err = app.peer.expect(p.ErrorMessage)
    assert err.id == MAX_PENDING and err.code is p.ErrorCode.BUSY
    forwarded = [host.expect(p.Status) for _ in range(MAX_PENDING)]
    host.send(p.Progress(forwarded[3].id, "job", p.JobState.RUNNING, 1, 2))
    assert app.peer.expect(p.Progress).id == 3  # the application's own id comes back
    app.close()
    wait_until(lambda: not s.server._routes, what="routes of a closed application dropped")


def test_applications_beyond_max_clients_are_refused(tmp_path: Path) -> None:
    port, host = socketpair_port()
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"), max_clients=2)
    s = Served(cfg, _once(port))
    try:
        apps = [s.raw_app(), s.raw_app()]
        wait_until(lambda: len(s.server._apps) == 2, what="two applications")
        third = s.raw_app()
        err = third.peer.expect(p.ErrorMessage)
        assert err.code is p.ErrorCode.BUSY
        with pytest.raises(EOFError):
            third.peer.recv(2)
        for a in [*apps, third]:
            a.close()
    finally:
        s.stop()
        host.close()


def test_replies_for_unknown_ids_are_dropped(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    host.send(p.Accepted("nobody-1", "job-z"))
    host.send(p.Result("nobody-2", "job-z", p.Op.BACKUP, True, (), 0, 1))
    host.send(p.Progress(None, "job-unknown", p.JobState.RUNNING, 1, 2))
    call = Background(lambda: status("job-1", config=s.config))
    req = host.expect(p.Status)
    host.send(p.Progress(req.id, "job-1", p.JobState.QUEUED, 0, 0))
    assert call.result().state == "queued"


def test_socket_is_0660_group_from_config_and_removed_on_stop(tmp_path: Path) -> None:
    port, host = socketpair_port()
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"), socket_group="0")
    s = Served(cfg, _once(port))
    st = os.stat(cfg.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
    s.stop()
    host.close()
    assert not os.path.exists(cfg.socket)


def test_socket_directory_must_be_writable_only_by_root(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    cfg = dataclasses.replace(FAST, socket=str(loose / "shim.sock"))
    with pytest.raises(ConfigError, match="writable by no one else"):
        Server(cfg, opener=_never).listen()


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "shim.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: left by a dead serve
    cfg = dataclasses.replace(FAST, socket=str(path))
    s = Served(cfg, _never)
    try:
        with pytest.raises(ConfigError, match="already listening"):
            Server(cfg, opener=_never).listen()
    finally:
        s.stop()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        Server(cfg, opener=_never).listen()


def test_client_prefers_the_serve_socket(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    client = Client(s.config)
    call = Background(lambda: client.status("j"))
    req = host.expect(p.Status)
    host.send(p.Progress(req.id, "j", p.JobState.RUNNING, 0, 0))
    call.result()
    assert client.via_serve
    client.close()


def test_host_rejection_reaches_the_application(served: tuple[Served, FakeHost]) -> None:
    s, host = served
    call = Background(lambda: backup(["hb-disk-9"], config=s.config))
    req = host.expect(p.Backup)
    host.send(p.ErrorMessage(req.id, p.ErrorCode.UNKNOWN_DISK, "no disk hb-disk-9"))
    with pytest.raises(Rejected) as info:
        call.result()
    assert info.value.code == "unknown-disk"
