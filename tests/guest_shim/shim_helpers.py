"""Test helpers for guest_shim: a fake host that speaks guest_shim.protocol over the host's end of
a stand-in port (a socketpair, a pty master, or a unix socket), and a thread runner.

The fake host is deliberately small and strict: it fails the test (AssertionError) when the
guest sends something unexpected or nothing in time.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from guest_shim import protocol as p
from guest_shim.config import ShimConfig

M = TypeVar("M")

FAST = ShimConfig(
    socket="/nonexistent/hyperback-shim.sock",
    connect_timeout=3.0,
    reply_timeout=3.0,
    job_timeout=15.0,
    status_interval=30.0,
    sysfs="/nonexistent-sysfs",
)


class FakeHost:
    """The host's end of a channel: reads guest messages, writes host messages."""

    def __init__(self, fd: int, *, owner: Any = None) -> None:
        self.fd = fd
        self._owner = owner  # keeps a socket object alive
        self.reader = p.MessageReader(p.Direction.TO_HOST)
        self.pending: list[p.Message | p.ProtocolError] = []
        self.raw = bytearray()  # every byte the guest sent
        self.closed = False

    @classmethod
    def from_socket(cls, sock: socket.socket) -> FakeHost:
        return cls(sock.fileno(), owner=sock)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._owner is not None:
                self._owner.close()
            else:
                os.close(self.fd)

    # --- receiving --------------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            raise EOFError("the guest closed the channel")
        self.raw += data
        self.pending.extend(self.reader.feed(data))
        return True

    def recv(self, timeout: float = 10.0) -> p.Message | p.ProtocolError:
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise AssertionError(f"the guest sent nothing within {timeout} s")
        return self.pending.pop(0)

    def expect(self, cls: type[M], timeout: float = 10.0) -> M:
        msg = self.recv(timeout)
        assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg!r}"
        return msg

    def nothing_for(self, seconds: float) -> bool:
        """True if the guest sent nothing for ``seconds``."""
        if self.pending:
            return False
        try:
            return not self._fill(seconds)
        except EOFError:
            return True

    def answer_sync(self, timeout: float = 10.0) -> p.Sync:
        sync = self.expect(p.Sync, timeout)
        self.send_raw(p.sync_ack_frame(sync.id))
        return sync

    def handshake(self, role: p.Role = p.Role.CLIENT, timeout: float = 10.0) -> p.Sync:
        """Answer the guest's sync and take its hello."""
        sync = self.answer_sync(timeout)
        hello = self.expect(p.Hello, timeout)
        assert hello.role == role
        return sync

    # --- sending ----------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def send(self, msg: p.Message) -> None:
        self.send_raw(p.encode(msg))


def socketpair_port() -> tuple[Any, FakeHost]:
    """A socketpair standing in for the port: (guest Port, FakeHost)."""
    from guest_shim.port import Port

    guest, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Port.from_fd(guest.detach(), label="socketpair"), FakeHost.from_socket(host)


class Background:
    """Runs ``fn`` in a thread; ``result()`` returns its value or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the test thread
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 20.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the call did not return within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def ok_result(
    request_id: p.RequestId | None, job: str, serials: tuple[str, ...] = ("hb-disk-1",)
) -> p.Result:
    disks = tuple(
        p.DiskOutcome(s, 1000 + i, snapshot=f"snap{i:012d}", change_detection=p.ChangeDetection.DIRTY_BITMAP)
        for i, s in enumerate(serials)
    )
    return p.Result(
        request_id, job, p.Op.BACKUP, True, disks, sum(d.bytes for d in disks), 1.25, quiesced=True
    )
