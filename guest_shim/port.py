"""The byte stream to the host: finding the virtio-serial port, and reading and writing it.

The port is found by name (``org.hyperback.agent.0``) through
``/sys/class/virtio-ports/*/name`` -> ``/dev/<vportNpM>``, which works without udev, or through
``/dev/virtio-ports/<name>`` when udev made that link.

Facts of virtio-serial this module handles (see docs/wire-protocol.md, section 1):

* ``read()`` returns 0 (EOF) while the host side is not connected, and ``poll()`` reports
  ``POLLHUP``: :meth:`Port.host_connected` tells, :meth:`Port.wait_connected` waits (sleeping:
  a hung-up port would make ``poll()`` return at once, forever).
* ``write()`` blocks until the host connects: the port is opened ``O_NONBLOCK`` and every write
  waits with ``poll()`` up to a deadline; one ``write()`` moves at most 32 KiB, so writes loop.
* One opener only: a second ``open()`` fails with EBUSY (:class:`PortBusy`).

A :class:`Port` can also wrap a unix socket or any stream file descriptor (a socketpair end, a
pty) standing in for the port in tests and development; for those a hang-up is final
(``persistent`` is False), whereas a virtio-serial port stays open across host reconnects.
OSError is converted here, once, into HostNotConnected (or TimedOut for a deadline).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import select
import socket
import time
import tty

from .errors import HostNotConnected, PortBusy, PortNotFound, TimedOut

log = logging.getLogger(__name__)

DEFAULT_PORT_NAME = "org.hyperback.agent.0"
MAX_WRITE = 32 * 1024  # the most one write() to a virtio-serial port moves
READ_SIZE = 64 * 1024
UNIX_PREFIX = "unix:"

_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
_GONE_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENXIO, errno.ENOTCONN, errno.EBADF)


def find_port(name: str = DEFAULT_PORT_NAME, *, sys_root: str = "/sys", dev_root: str = "/dev") -> str:
    """The device path of the virtio-serial port called ``name``.

    Raises PortNotFound (listing the port names this guest has) if there is none.
    """
    link = os.path.join(dev_root, "virtio-ports", name)
    if os.path.exists(link):
        return link
    seen = []
    for name_file in sorted(glob.glob(os.path.join(sys_root, "class", "virtio-ports", "*", "name"))):
        try:
            with open(name_file, encoding="utf-8", errors="replace") as f:
                port_name = f.read().strip()
        except OSError:
            continue
        if port_name == name:
            return os.path.join(dev_root, os.path.basename(os.path.dirname(name_file)))
        seen.append(port_name or "(unnamed)")
    have = ", ".join(seen) if seen else "none"
    raise PortNotFound(
        f"no virtio-serial port named {name} in this guest (ports: {have}); "
        "the VM needs the hyperback channel in its domain XML"
    )


class Port:
    """A non-blocking byte stream to the host with poll-based deadlines.

    ``persistent``: the file descriptor outlives host disconnects (a virtio-serial port), so
    after a hang-up one waits for the host to come back instead of reopening.
    """

    def __init__(self, fd: int, *, label: str, persistent: bool) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self.label = label
        self.persistent = persistent

    def __repr__(self) -> str:
        return f"<Port {self.label} fd={self._fd}>"

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def open_device(cls, path: str) -> Port:
        """Open a character device (the virtio-serial port, or a pty standing in for it)."""
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as e:
            raise PortNotFound(f"{path} does not exist") from e
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise PortBusy(
                    f"{path} is in use by another process (a virtio-serial port has one opener); "
                    "run the request through `hyperback-shim serve`"
                ) from e
            if e.errno in (errno.EACCES, errno.EPERM):
                raise HostNotConnected(f"permission denied opening {path} (run as root)") from e
            raise HostNotConnected(f"cannot open {path}: {e.strerror}") from e
        try:
            if os.isatty(fd):  # a pty standing in for the port: no line discipline, no echo
                tty.setraw(fd)
        except OSError as e:
            os.close(fd)
            raise HostNotConnected(f"cannot set {path} to raw mode: {e.strerror}") from e
        return cls(fd, label=path, persistent=True)

    @classmethod
    def connect_unix(cls, path: str, *, missing_ok: bool = False) -> Port | None:
        """Connect to a unix stream socket (``serve``'s, or a host-side socket in tests).

        With ``missing_ok``, None when nobody listens there (no file, or connection refused).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if missing_ok:
                return None
            raise HostNotConnected(f"nothing listens on {path}") from e
        except PermissionError as e:
            sock.close()
            raise HostNotConnected(
                f"permission denied connecting to {path} (run as root or as a member of its group)"
            ) from e
        except OSError as e:
            sock.close()
            raise HostNotConnected(f"cannot connect to {path}: {e.strerror or e}") from e
        return cls(sock.detach(), label=f"{UNIX_PREFIX}{path}", persistent=False)

    @classmethod
    def from_fd(cls, fd: int, *, label: str = "fd", persistent: bool = False) -> Port:
        """Wrap an open stream file descriptor (takes ownership; e.g. one end of a socketpair)."""
        return cls(fd, label=f"{label}:{fd}", persistent=persistent)

    # --- state ----------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise HostNotConnected(f"{self.label} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as e:
                log.debug("closing %s: %s", self.label, e)

    def __enter__(self) -> Port:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poll(self, events: int, timeout: float) -> int:
        poller = select.poll()
        poller.register(self.fileno(), events)
        ready = poller.poll(max(0, int(timeout * 1000 + 0.999)))
        return ready[0][1] if ready else 0

    def host_connected(self) -> bool:
        """True unless the other end is hung up (POLLHUP: the host is not connected)."""
        if self._fd < 0:
            return False
        return not self._poll(select.POLLOUT, 0) & _HANGUP

    def wait_connected(self, deadline: float) -> bool:
        """Wait until the host is connected or ``deadline`` (time.monotonic()) passes.

        A non-persistent stream that hung up never comes back: False at once.
        """
        interval = 0.05
        while True:
            if self.host_connected():
                return True
            now = time.monotonic()
            if not self.persistent or now >= deadline:
                return False
            time.sleep(min(interval, deadline - now))
            interval = min(interval * 2, 0.5)

    # --- reading --------------------------------------------------------------------------

    def read(self, timeout: float) -> bytes | None:
        """Up to READ_SIZE bytes; None if nothing arrived within ``timeout`` seconds.

        Raises HostNotConnected when the host hangs up (EOF, POLLHUP, EIO).
        """
        revents = self._poll(select.POLLIN, timeout)
        if not revents:
            return None
        data = self.read_nowait()
        if data is None:
            if revents & _HANGUP:
                raise HostNotConnected(f"the host hung up ({self.label})")
            return None
        return data

    def read_nowait(self) -> bytes | None:
        """What can be read now; None if nothing.  Raises HostNotConnected at EOF."""
        try:
            data = os.read(self.fileno(), READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                raise HostNotConnected(f"the host hung up ({self.label}: {e.strerror})") from e
            raise HostNotConnected(f"reading {self.label}: {e.strerror}") from e
        if not data:
            raise HostNotConnected(f"the host is not connected ({self.label}: end of stream)")
        log.debug("%s <- %d bytes", self.label, len(data))
        return data

    # --- writing --------------------------------------------------------------------------

    def write_some(self, data: bytes | bytearray | memoryview) -> int:
        """One non-blocking write of at most MAX_WRITE bytes; 0 if it would block."""
        try:
            n = os.write(self.fileno(), memoryview(data)[:MAX_WRITE])
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                raise HostNotConnected(f"the host hung up ({self.label}: {e.strerror})") from e
            raise HostNotConnected(f"writing {self.label}: {e.strerror}") from e
        return n

    def write_all(self, data: bytes, deadline: float) -> None:
        """Write everything by ``deadline`` (time.monotonic()), looping on short writes.

        Raises HostNotConnected if the host is (or goes) away, TimedOut at the deadline.
        """
        view = memoryview(data)
        while view:
            n = self.write_some(view)
            view = view[n:]
            if not view:
                break
            if n:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut(f"the host did not take {len(view)} more bytes in time ({self.label})")
            revents = self._poll(select.POLLOUT, min(remaining, 1.0))
            if revents & _HANGUP and not revents & select.POLLOUT:
                raise HostNotConnected(f"the host is not connected ({self.label})")
        log.debug("%s -> %d bytes", self.label, len(data))


def open_port(spec: str = DEFAULT_PORT_NAME, *, sys_root: str = "/sys", dev_root: str = "/dev") -> Port:
    """Open the port ``spec`` names: a port name, a device path, or ``unix:PATH`` (a socket
    standing in for the port, for development and tests)."""
    if spec.startswith(UNIX_PREFIX):
        port = Port.connect_unix(spec[len(UNIX_PREFIX) :])
        assert port is not None
        return port
    path = spec if "/" in spec else find_port(spec, sys_root=sys_root, dev_root=dev_root)
    return Port.open_device(path)
