"""``hyperback-shim serve``: owns the port and serves local applications over a unix socket.

A virtio-serial port has one opener, so one process holds it and multiplexes:

* Applications connect to the socket (mode 0660, owner root, group from the configuration, in a
  directory only root can write) and speak the wire protocol to it: ``serve`` answers their
  ``sync`` itself, validates their requests as the host would, and forwards ``backup``,
  ``restore``, ``status`` and ``list`` with ids of its own (``<random word>-<n>``: unique for its
  lifetime, and never equal to an id of an earlier ``serve``), routing the host's replies back
  with the application's id.  Unsolicited ``progress``/``result`` go to the application whose
  request started the job.  Unknown ids are logged and dropped.
* It answers the host's ``freeze``/``thaw`` and ``check`` itself (``freeze.Freezer``, ``checks.Checker``).
* The port goes through the states of :class:`PortState`.  When the host goes away, every
  outstanding request is answered ``not-connected``, file systems are thawed, and once the host
  is back the port is resynchronised (0xFF + sync, discard until the matching ack).
* Bounds: ``max_clients`` applications, ``MAX_PENDING`` outstanding requests each,
  ``MAX_FRAME`` per line and ``MAX_OUTBUF`` of unread replies per application.

Single-threaded (a selector loop) apart from the freeze watchdog and a running check command,
which wake the loop through a pipe.  :meth:`Server.stop` may be called from any thread or a
signal handler; the loop then thaws, removes its socket and returns.

Why one module: the port, the applications and the requests in flight are one state machine over
one selector and one id map; what answers the host on its own (freezing, checks, seen disks) already
lives in modules of its own, and what remains would have to pass the loop's internals around.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import grp
import itertools
import logging
import os
import secrets
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .checks import Checker
from .client import SHIM_VERSION
from .config import ShimConfig
from .errors import ConfigError, FrameTooLong, HostNotConnected, ProtocolError, ShimError
from .freeze import Freezer
from .port import Port, open_port
from .protocol import (
    Accepted,
    Backup,
    Check,
    Direction,
    ErrorCode,
    ErrorMessage,
    Freeze,
    Hello,
    ListSnapshots,
    Message,
    MessageReader,
    Progress,
    Release,
    Released,
    RequestId,
    Restore,
    Result,
    Resync,
    Role,
    See,
    Seeing,
    Snapshots,
    Status,
    Sync,
    Thaw,
    ThawCause,
    encode,
    error_reply,
    sync_ack_frame,
)

log = logging.getLogger(__name__)

MAX_PENDING = 8  # outstanding requests per application
MAX_OUTBUF = 1024 * 1024  # unread reply bytes per application before it is dropped
MAX_PORT_OUTBUF = 4 * 1024 * 1024
CONNECT_POLL = 0.25  # how often to look whether the host connected (a hung-up port cannot be polled)
REOPEN_INTERVAL = 2.0

Forwardable = (Backup, Restore, Status, ListSnapshots, See, Release)


class PortState(enum.Enum):
    CLOSED = "closed"  # not open (not found, busy, or a stand-in that hung up)
    WAITING = "waiting"  # open, the host is not connected
    SYNCING = "syncing"  # 0xFF + sync sent, waiting for the ack
    READY = "ready"


@dataclass(eq=False)
class _App:
    """One connected local application."""

    sock: socket.socket
    label: str
    reader: MessageReader = field(default_factory=lambda: MessageReader(Direction.TO_HOST))
    outbuf: bytearray = field(default_factory=bytearray)
    routes: set[str] = field(default_factory=set)
    closed: bool = False


@dataclass(eq=False)
class _Route:
    """An application's request forwarded to the host under ``wire_id``."""

    wire_id: str
    app: _App
    app_id: RequestId
    kind: str
    job: str | None = None


class Server:
    """The serve loop.  ``opener`` opens the port (default: the configured one); ``freezer``
    answers freeze/thaw (default: a real one)."""

    def __init__(
        self,
        config: ShimConfig,
        *,
        opener: Callable[[], Port] | None = None,
        freezer: Freezer | None = None,
    ) -> None:
        self.config = config
        self._opener = opener or (lambda: open_port(config.port, sys_root=config.sysfs))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.freezer = freezer or Freezer(
            max_seconds=config.max_freeze_seconds, sys_root=config.sysfs, hook_dir=config.fsfreeze_hook_dir
        )
        self.freezer.notify = self._wake
        self.checker = Checker(config.check_commands, notify=self._wake)
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._socket_ino: int | None = None
        self._apps: set[_App] = set()
        self._routes: dict[str, _Route] = {}
        self._jobs: dict[str, _Route] = {}
        self._queued: list[Message] = []  # requests waiting for the sync to finish
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._port: Port | None = None
        self._port_out = bytearray()
        self._port_reader = MessageReader(Direction.TO_GUEST)
        self._port_registered = 0
        self.state = PortState.CLOSED
        self._resync = Resync()
        self._sync_interval = 1.0
        self._next_action = 0.0  # monotonic time of the next port timer
        self._open_failures = 0
        self._stopping = False
        self.ready = False  # the socket is listening

    # --- public ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (thread- and signal-safe)."""
        self._stopping = True
        self._wake()

    def serve_forever(self) -> None:
        """Listen, run until :meth:`stop`, then thaw and clean up (also on exceptions)."""
        try:
            if self._listener is None:
                self.listen()
            while not self._stopping:
                self._step()
        finally:
            self._shutdown()

    def listen(self) -> None:
        """Create the socket (0660, group from the configuration, in a root-only directory)."""
        path = self.config.socket
        parent = os.path.dirname(path) or "."
        try:
            st = os.stat(parent)
        except OSError as e:
            raise ConfigError(f"socket directory {parent}: {e.strerror}") from e
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"socket directory {parent} must be owned by root and writable by no one else "
                f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
            )
        gid = _group_id(self.config.socket_group)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot create socket {path}: {e.strerror}") from e
        finally:
            os.umask(old_umask)
        try:
            os.chown(path, os.geteuid(), gid)
            os.chmod(path, 0o660)
            self._socket_ino = os.stat(path).st_ino
            sock.listen(16)
        except OSError as e:
            sock.close()
            os.unlink(path)
            raise ConfigError(f"cannot set up socket {path}: {e.strerror}") from e
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._on_accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.ready = True
        log.info("serving %s (group %s), port %s", path, self.config.socket_group, self.config.port)

    # --- the loop -------------------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        if self.state is not PortState.READY and now >= self._next_action:
            self._port_timer()
        timeout = 1.0
        if self.state is not PortState.READY:
            timeout = max(0.0, min(timeout, self._next_action - time.monotonic()))
        for key, mask in self._sel.select(timeout):
            if self._stopping:
                break
            key.data(mask)
        self._deliver_notices()

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:  # the loop has ended
            return
        with contextlib.suppress(OSError):  # full: the loop wakes anyway
            os.write(fd, b"!")

    def _on_wake(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _deliver_notices(self) -> None:
        for notice in [*self.freezer.take_notices(), *self.checker.take_notices()]:
            if self.state is PortState.READY:
                self._port_send(notice)
            else:
                log.info("dropping %s: the host is not connected", notice)

    # --- the port -------------------------------------------------------------------------

    def _port_timer(self) -> None:
        if self.state is PortState.CLOSED:
            try:
                self._port = self._opener()
            except HostNotConnected as e:
                self._open_failures += 1
                level = logging.WARNING if self._open_failures == 1 else logging.DEBUG
                log.log(level, "cannot open the port (will retry): %s", e)
                self._next_action = time.monotonic() + REOPEN_INTERVAL
                return
            self._open_failures = 0
            log.info("opened %s", self._port.label)
            self.state = PortState.WAITING
        if self.state is PortState.WAITING:
            assert self._port is not None
            if self._port.host_connected():
                self._start_sync()
            elif not self._port.persistent:
                self._close_port()
            else:
                self._next_action = time.monotonic() + CONNECT_POLL
        elif self.state is PortState.SYNCING:
            log.info("no sync-ack within %.0f s; syncing again", self._sync_interval)
            self._sync_interval = min(self._sync_interval * 2, 4.0)
            self._send_sync()

    def _start_sync(self) -> None:
        assert self._port is not None
        self.state = PortState.SYNCING
        self._sync_interval = 1.0
        self._port_registered = 0
        self._update_port_events()
        self._send_sync()

    def _send_sync(self) -> None:
        self._port_reader.reset()
        self._port_out.clear()  # anything unsent is for an earlier conversation
        self._port_write(self._resync.start())
        log.debug("port -> 0xFF sync %s", self._resync.sync_id)
        self._next_action = time.monotonic() + self._sync_interval

    def _close_port(self) -> None:
        if self._port is not None:
            if self._port_registered:
                self._sel.unregister(self._port.fileno())
                self._port_registered = 0
            self._port.close()
            self._port = None
        self.state = PortState.CLOSED
        self._next_action = time.monotonic() + 0.5

    def _port_lost(self, why: str) -> None:
        """The host went away: fail what is outstanding, thaw, wait for it to come back."""
        log.warning("host disconnected: %s", why)
        self.freezer.thaw_all(ThawCause.DISCONNECT)
        self.freezer.take_notices()  # nobody to tell
        for wire_id, route in list(self._routes.items()):
            extra = f"; job {route.job} may still finish: ask status later" if route.job else ""
            gone = ErrorMessage(route.app_id, ErrorCode.NOT_CONNECTED, f"the host went away{extra}")
            self._reply(route.app, gone)
            route.app.routes.discard(wire_id)
        self._routes.clear()
        self._jobs.clear()
        self._queued.clear()
        self._port_out.clear()
        self._port_reader.reset()
        if self._port is not None and self._port.persistent:
            if self._port_registered:
                self._sel.unregister(self._port.fileno())
                self._port_registered = 0
            self.state = PortState.WAITING
            self._next_action = time.monotonic() + CONNECT_POLL
        else:
            self._close_port()

    def _update_port_events(self) -> None:
        if self._port is None or self.state not in (PortState.SYNCING, PortState.READY):
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._port_out else 0)
        if want == self._port_registered:
            return
        if self._port_registered:
            self._sel.modify(self._port.fileno(), want, self._on_port)
        else:
            self._sel.register(self._port.fileno(), want, self._on_port)
        self._port_registered = want

    def _port_write(self, data: bytes) -> bool:
        if len(self._port_out) + len(data) > MAX_PORT_OUTBUF:
            log.warning("the host is not reading; dropped %d bytes", len(data))
            return False
        self._port_out += data
        self._flush_port()
        return True

    def _flush_port(self) -> None:
        assert self._port is not None
        try:
            while self._port_out:
                n = self._port.write_some(self._port_out)
                if not n:
                    break
                del self._port_out[:n]
        except HostNotConnected as e:
            self._port_lost(str(e))
            return
        self._update_port_events()

    def _port_send(self, msg: Message) -> bool:
        log.debug("port -> %s", msg)
        return self._port_write(encode(msg))

    def _on_port(self, mask: int) -> None:
        if self._port is None:
            return
        if mask & selectors.EVENT_WRITE and self._port_out:
            self._flush_port()
            if self._port is None or self.state not in (PortState.SYNCING, PortState.READY):
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = self._port.read_nowait()
        except HostNotConnected as e:
            self._port_lost(str(e))
            return
        if data is None:
            return
        for item in self._port_reader.feed(data):
            if self.state not in (PortState.SYNCING, PortState.READY):
                break
            self._from_host(item)

    def _from_host(self, item: Message | ProtocolError) -> None:
        if self.state is PortState.SYNCING:
            if self._resync.is_ack(item):
                log.info("host connected; synchronised")
                self.state = PortState.READY
                self._port_send(Hello(SHIM_VERSION, Role.SERVE))
                queued, self._queued = self._queued, []
                for msg in queued:
                    self._port_send(msg)
            elif isinstance(item, Thaw):
                self._port_send(self.freezer.thaw(item))  # thawing is always safe
            else:
                log.debug("resync: discarding %s", item)
            return
        if isinstance(item, ProtocolError):
            log.warning("dropped a malformed message from the host: %s", item)
            reply = error_reply(item)
            if reply is not None:
                self._port_send(reply)
            return
        log.debug("port <- %s", item)
        if isinstance(item, (Freeze, Thaw)):
            self._port_send(self.freezer.handle(item))
        elif isinstance(item, Check):
            if (answer := self.checker.handle(item)) is not None:  # else a command runs: a notice follows
                self._port_send(answer)
        elif isinstance(item, Accepted):
            route = self._routes.get(str(item.id))
            if route is None:
                log.info("dropping accepted for unknown id %s", item.id)
                return
            route.job = item.job
            self._jobs[item.job] = route
            self._reply(route.app, dataclasses.replace(item, id=route.app_id))
        elif isinstance(item, (ErrorMessage, Snapshots, Seeing, Released)):
            if item.id is None:
                log.warning("the host reports: %s", item)
                return
            route = self._pop_route(item.id)
            if route is not None:
                self._reply(route.app, dataclasses.replace(item, id=route.app_id))
        elif isinstance(item, (Progress, Result)):
            if item.id is not None:  # the reply to a status, or the result of a backup/restore
                route = self._pop_route(item.id)
                app_id: RequestId | None = route.app_id if route else None
            else:  # unsolicited: to the application that started the job
                route = self._jobs.get(item.job)
                if route is not None and isinstance(item, Result):
                    self._pop_route(route.wire_id)
                app_id = route.app_id if route is not None and isinstance(item, Result) else None
            if route is None:
                log.info("dropping %s of job %s: no application waits for it", item.TYPE, item.job)
                return
            self._reply(route.app, dataclasses.replace(item, id=app_id))
        else:
            log.debug("ignoring %s from the host", item.TYPE)

    def _pop_route(self, wire_id: RequestId) -> _Route | None:
        route = self._routes.pop(str(wire_id), None) if isinstance(wire_id, str) else None
        if route is None:
            log.info("dropping a reply for unknown id %s", wire_id)
            return None
        route.app.routes.discard(str(wire_id))
        if route.job is not None and self._jobs.get(route.job) is route:
            del self._jobs[route.job]
        return route

    # --- applications ---------------------------------------------------------------------

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept: %s", e)
            return
        label = _peer_label(sock)
        if len(self._apps) >= self.config.max_clients:
            log.warning("refusing %s: %d applications connected already", label, len(self._apps))
            try:
                sock.setblocking(False)
                sock.send(encode(ErrorMessage(None, ErrorCode.BUSY, "too many applications connected")))
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        app = _App(sock, label)
        self._apps.add(app)
        self._sel.register(sock, selectors.EVENT_READ, lambda m, a=app: self._on_app(a, m))
        log.debug("application connected: %s", label)

    def _on_app(self, app: _App, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_app(app)
        if app.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = app.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop_app(app, f"read error: {e}")
            return
        if not data:
            self._drop_app(app, "closed")
            return
        for item in app.reader.feed(data):
            if app.closed:
                return
            self._from_app(app, item)

    def _from_app(self, app: _App, item: Message | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            log.info("malformed message from %s: %s", app.label, item)
            reply = error_reply(item)
            if reply is None and isinstance(item, FrameTooLong):
                reply = ErrorMessage(None, ErrorCode.BAD_REQUEST, "line too long; discarded")
            if reply is not None:
                self._reply(app, reply)
            return
        if isinstance(item, Sync):
            self._reply_raw(app, sync_ack_frame(item.id))
            return
        if isinstance(item, Hello):
            log.debug("%s: hello %s", app.label, item.shim)
            return
        if not isinstance(item, Forwardable):
            rid = getattr(item, "id", None)
            why = f"{item.TYPE} is not accepted from applications"
            self._reply(app, ErrorMessage(rid, ErrorCode.BAD_REQUEST, why))
            return
        if len(app.routes) >= MAX_PENDING:
            why = f"more than {MAX_PENDING} requests outstanding"
            self._reply(app, ErrorMessage(item.id, ErrorCode.BUSY, why))
            return
        if self.state not in (PortState.SYNCING, PortState.READY):
            why = "the host agent is not connected to this VM's channel"
            self._reply(app, ErrorMessage(item.id, ErrorCode.NOT_CONNECTED, why))
            return
        wire_id = f"{self._prefix}-{next(self._counter)}"
        forwarded = dataclasses.replace(item, id=wire_id)
        route = _Route(wire_id, app, item.id, item.TYPE)
        self._routes[wire_id] = route
        app.routes.add(wire_id)
        if self.state is PortState.READY:
            if not self._port_send(forwarded):
                self._pop_route(wire_id)
                why = "the channel to the host is congested"
                self._reply(app, ErrorMessage(item.id, ErrorCode.BUSY, why))
        else:
            self._queued.append(forwarded)

    def _reply(self, app: _App, msg: Message) -> None:
        log.debug("%s <- %s", app.label, msg)
        self._reply_raw(app, encode(msg))

    def _reply_raw(self, app: _App, data: bytes) -> None:
        if app.closed:
            return
        if len(app.outbuf) + len(data) > MAX_OUTBUF:
            self._drop_app(app, "not reading its replies")
            return
        app.outbuf += data
        self._flush_app(app)

    def _flush_app(self, app: _App) -> None:
        try:
            while app.outbuf:
                n = app.sock.send(app.outbuf)
                del app.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._drop_app(app, f"write error: {e}")
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if app.outbuf else 0)
        self._sel.modify(app.sock, want, self._sel.get_key(app.sock).data)

    def _drop_app(self, app: _App, why: str) -> None:
        if app.closed:
            return
        app.closed = True
        log.debug("application %s gone: %s", app.label, why)
        for wire_id in app.routes:
            route = self._routes.pop(wire_id, None)
            if route is not None and route.job is not None and self._jobs.get(route.job) is route:
                del self._jobs[route.job]
        app.routes.clear()
        self._queued = [m for m in self._queued if str(getattr(m, "id", "")) in self._routes]
        self._apps.discard(app)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(app.sock)
        app.sock.close()

    # --- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        notice = self.freezer.thaw_all(ThawCause.SHUTDOWN)
        if notice is not None and self._port is not None and self.state is PortState.READY:
            try:
                self._port.write_all(bytes(self._port_out) + encode(notice), time.monotonic() + 1.0)
            except ShimError as e:
                log.debug("could not send the shutdown thaw notice: %s", e)
        for app in list(self._apps):
            self._drop_app(app, "serve stopping")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                if os.stat(self.config.socket).st_ino == self._socket_ino:
                    os.unlink(self.config.socket)
            except OSError:
                pass
        if self._port is not None:
            self._port.close()
            self._port = None
        self._sel.close()
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.state = PortState.CLOSED
        log.info("serve stopped")


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group {group!r}: no such group") from None


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a serve that died
        return
    finally:
        probe.close()
    raise ConfigError(f"another serve is already listening on {path}")


def _peer_label(sock: socket.socket) -> str:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return f"app(pid={pid},uid={uid})"
    except OSError:
        return "app(?)"
