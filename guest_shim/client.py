"""The library guest applications call: ``backup()``, ``restore()``, ``status()``,
``list_snapshots()``, ``see()`` and ``release()``.

Each call is a local, synchronous request; only the request crosses to the host.  The client
talks to ``hyperback-shim serve`` over its unix socket when that socket exists (a virtio-serial
port has one opener), otherwise directly to the port.  Either way it speaks the wire protocol
(docs/wire-protocol.md): ``0xFF`` + ``sync``, discard until the matching ``sync-ack``, ``hello``,
then the request.  When it owns the port it also answers the host's ``freeze``/``thaw`` while
it waits (``serve`` does that otherwise), and it thaws before it returns or raises.

Results are frozen dataclasses (:class:`JobResult`, :class:`JobStatus`, :class:`SnapshotList`);
failures raise the :mod:`guest_shim.errors` tree:

* :class:`HostNotConnected` - no port / socket, port busy, host not connected or gone mid-call
  (``job`` is set if the job had started: ask ``status(job)`` later);
* :class:`Rejected` - the host refused the request (``code``: rate-limited, unknown-disk, ...);
* :class:`Failed` - the job ran and failed (``result`` holds the host's report);
* :class:`TimedOut` - the host stayed silent past a deadline;
* :class:`InvalidArgument` - an argument cannot go on the wire (a ValueError too).

Deadlines: ``connect_timeout`` for the host to connect and answer ``sync``, ``reply_timeout``
for the first reply to a request, ``timeout`` (default ``job_timeout``) for the whole call.  After
``status_interval`` seconds without a word from the host during a job, the client
resynchronises and asks ``status`` (so a lost ``result`` is recovered).

Why one module, longer than the others: :class:`Client` is one connection's state (sync, the
queue, the freezer it answers with) and each call is a few lines over its private request and wait
steps; the calls split off would have to reach into that state, or make it public.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from .config import ShimConfig, load_config
from .errors import (
    Failed,
    HostNotConnected,
    InvalidArgument,
    ProtocolError,
    Rejected,
    ShimError,
    TimedOut,
    UnsupportedVersion,
)
from .freeze import Freezer
from .port import Port, open_port
from .protocol import (
    ALL,
    LATEST,
    Accepted,
    Backup,
    Direction,
    DiskOutcome,
    ErrorCode,
    ErrorInfo,
    ErrorMessage,
    Freeze,
    Hello,
    JobState,
    ListSnapshots,
    Message,
    MessageReader,
    Op,
    Policy,
    Progress,
    Release,
    Released,
    RequestId,
    Restore,
    RestoreMode,
    Result,
    Resync,
    Role,
    See,
    Seeing,
    SnapshotInfo,
    Snapshots,
    Status,
    Thaw,
    ThawCause,
    encode,
    error_reply,
)

log = logging.getLogger(__name__)

SHIM_VERSION = "0.1.0"
_FROZEN_TICK = 0.2  # how often to look for watchdog notices while file systems are frozen


@dataclass(frozen=True)
class JobResult:
    """A finished backup or restore, as the host reported it."""

    job: str
    op: Op
    ok: bool
    disks: tuple[DiskOutcome, ...]
    bytes: int
    seconds: float
    quiesced: bool = False
    error: ErrorInfo | None = None

    @classmethod
    def from_message(cls, msg: Result) -> JobResult:
        return cls(msg.job, msg.op, msg.ok, msg.disks, msg.bytes, msg.seconds, msg.quiesced, msg.error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the wire's member names."""
        out: dict[str, Any] = {
            "job": self.job,
            "op": self.op.value,
            "ok": self.ok,
            "disks": [d.to_wire() for d in self.disks],
            "bytes": self.bytes,
            "seconds": self.seconds,
            "quiesced": self.quiesced,
        }
        if self.error is not None:
            out["error"] = self.error.to_wire()
        return out


@dataclass(frozen=True)
class JobStatus:
    """Where a job is: ``state`` is queued, running, done or failed; ``result`` once finished."""

    job: str
    state: str
    done: int = 0
    total: int = 0
    result: JobResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "state": self.state, "done": self.done, "total": self.total}
        if self.result is not None:
            out["result"] = self.result.to_dict()
        return out


@dataclass(frozen=True)
class SnapshotList:
    """Snapshots of this VM's disks, newest first; ``truncated`` if the host had more."""

    snapshots: tuple[SnapshotInfo, ...]
    truncated: bool = False

    def __iter__(self) -> Iterator[SnapshotInfo]:
        return iter(self.snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)

    def to_dict(self) -> dict[str, Any]:
        return {"snapshots": [s.to_wire() for s in self.snapshots], "truncated": self.truncated}


@dataclass(frozen=True)
class SeenSnapshot:
    """A snapshot the host attached read-only: ``serial`` names its disk in this guest until
    ``expires`` (Unix time); ``device`` and ``mount`` once the CLI found and mounted it."""

    disk: str
    snapshot: str
    serial: str
    bytes: int
    expires: float
    device: str | None = None
    mount: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "snapshot": self.snapshot, "serial": self.serial, "bytes": self.bytes,
                "expires": self.expires, "device": self.device, "mount": self.mount}


ProgressCallback = Callable[[JobStatus], None]
_M = TypeVar("_M")


def _build(factory: Callable[..., _M], *args: Any, **kwargs: Any) -> _M:
    """A message from user-supplied values; bad values are InvalidArgument, not wire errors."""
    try:
        return factory(*args, **kwargs)
    except ProtocolError as e:
        raise InvalidArgument(e.message) from None


class Client:
    """One conversation with the host (directly over the port, or through ``serve``).

    Connects lazily, on the first call, and keeps the connection for further calls; use it as a
    context manager or call :meth:`close`.  ``port`` gives an explicit byte stream (for tests, or
    a caller that opened the port itself; the client closes it); ``answer_freeze`` says whether
    this client answers ``freeze``/``thaw`` (default: when it talks to the port, not to ``serve``).
    Not thread-safe: use one Client per thread (each holds its own connection).
    """

    def __init__(
        self,
        config: ShimConfig | None = None,
        *,
        port: Port | None = None,
        answer_freeze: bool | None = None,
        freezer: Freezer | None = None,
    ) -> None:
        self.config = config if config is not None else load_config()
        self._port = port
        self._answer_freeze = answer_freeze
        self._freezer = freezer
        self._reader = MessageReader(Direction.TO_GUEST)
        self._queue: collections.deque[Message | ProtocolError] = collections.deque()
        self._synced = False
        self._id_prefix = secrets.token_hex(4)
        self._counter = 0
        self.via_serve = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Thaw anything still frozen (telling the host if it is there) and close the stream."""
        try:
            if self._freezer is not None:
                notice = self._freezer.thaw_all(ThawCause.SHUTDOWN)
                if notice is not None and self._port is not None and not self._port.closed:
                    try:
                        self._port.write_all(encode(notice), time.monotonic() + 1.0)
                    except ShimError as e:
                        log.debug("could not send the shutdown thaw notice: %s", e)
        finally:
            if self._port is not None:
                self._port.close()
            self._synced = False

    def _open(self) -> Port:
        if self._port is not None and not self._port.closed:
            if self._answer_freeze is None:
                self._answer_freeze = not self.via_serve
            return self._port
        cfg = self.config
        port = Port.connect_unix(cfg.socket, missing_ok=True)
        if port is not None:
            log.debug("talking to serve at %s", cfg.socket)
            self.via_serve = True
        else:
            port = open_port(cfg.port, sys_root=cfg.sysfs)
            log.debug("talking to the host over %s", port.label)
            self.via_serve = False
        self._port = port
        if self._answer_freeze is None:
            self._answer_freeze = not self.via_serve
        return port

    def _connect(self, deadline: float) -> Port:
        port = self._open()
        if self._answer_freeze and self._freezer is None:
            self._freezer = Freezer(
                max_seconds=self.config.max_freeze_seconds,
                sys_root=self.config.sysfs,
                hook_dir=self.config.fsfreeze_hook_dir,
            )
        if not self._synced:
            connect_deadline = min(deadline, time.monotonic() + self.config.connect_timeout)
            if not port.wait_connected(connect_deadline):
                raise HostNotConnected(
                    f"the host agent is not connected to {port.label} "
                    f"(waited {self.config.connect_timeout:g} s); is hyperback running on the host?"
                )
            self._sync(connect_deadline)
            self._send(Hello(SHIM_VERSION, Role.CLIENT), deadline)
            self._synced = True
        return port

    # --- the stream -----------------------------------------------------------------------

    def _send(self, msg: Message, deadline: float) -> None:
        log.debug("-> %s", msg)
        self._write(encode(msg), deadline)

    def _write(self, data: bytes, deadline: float) -> None:
        assert self._port is not None
        try:
            self._port.write_all(data, max(deadline, time.monotonic() + 1.0))
        except HostNotConnected:
            self._lost()
            raise

    def _lost(self) -> None:
        """The host hung up: nothing may stay frozen, and the next call must resync."""
        self._synced = False
        self._queue.clear()
        self._reader.reset()
        if self._freezer is not None:
            self._freezer.thaw_all(ThawCause.DISCONNECT)

    def _fill(self, deadline: float) -> bool:
        """Read once into the queue; False if nothing came before ``deadline``."""
        assert self._port is not None
        wait = max(0.0, deadline - time.monotonic())
        if self._freezer is not None and self._freezer.holding:
            wait = min(wait, _FROZEN_TICK)
        try:
            data = self._port.read(wait)
        except HostNotConnected:
            self._lost()
            raise
        if data is None:
            return False
        self._queue.extend(self._reader.feed(data))
        return True

    def _flush_notices(self, deadline: float) -> None:
        if self._freezer is not None:
            for notice in self._freezer.take_notices():
                self._send(notice, deadline)

    def _sync(self, deadline: float) -> None:
        """Resynchronise (spec section 4); TimedOut if no matching ack by ``deadline``."""
        resync = Resync()
        interval = 1.0
        while True:
            self._queue.clear()
            self._reader.reset()
            self._write(resync.start(), deadline)
            log.debug("-> 0xFF sync %s", resync.sync_id)
            attempt_end = min(deadline, time.monotonic() + interval)
            while time.monotonic() < attempt_end:
                self._flush_notices(deadline)
                if not self._queue and not self._fill(attempt_end):
                    continue
                while self._queue:
                    item = self._queue.popleft()
                    if resync.is_ack(item):
                        log.debug("<- sync-ack %s", resync.sync_id)
                        return
                    if isinstance(item, ErrorMessage) and item.code == ErrorCode.UNSUPPORTED_VERSION:
                        raise Rejected(item.code.value, item.message)
                    if isinstance(item, Thaw) and self._freezer is not None:
                        self._send(self._freezer.thaw(item), deadline)  # thawing is always safe
                        continue
                    log.debug("resync: discarding %s", item)
            if time.monotonic() >= deadline:
                raise TimedOut("the host did not answer sync in time (it is connected but silent)")
            interval = min(interval * 2, 4.0)

    def _after_timeout(self) -> None:
        """Spec section 4: after a timeout, resynchronise. The next call waits for the ack; here
        the 0xFF + sync tells the host to drop any half-read line now."""
        self._synced = False
        if self._port is None or self._port.closed:
            return
        try:
            self._write(Resync().start(), time.monotonic() + 1.0)
        except ShimError as e:
            log.debug("resync after timeout: %s", e)

    def _receive(self, deadline: float) -> Message | None:
        """The next message for the caller, answering freeze/thaw on the way (when this client
        owns the port); None at ``deadline``.  Raises HostNotConnected if the host hangs up."""
        while True:
            self._flush_notices(deadline)
            if not self._queue:
                if time.monotonic() >= deadline:
                    return None
                self._fill(deadline)
                continue
            item = self._queue.popleft()
            if isinstance(item, UnsupportedVersion):
                log.warning("host sent a message of another protocol version: %s", item)
                continue
            if isinstance(item, ProtocolError):
                log.warning("dropped a malformed message from the host: %s", item)
                reply = error_reply(item)
                if reply is not None:
                    self._send(reply, deadline)
                continue
            log.debug("<- %s", item)
            if isinstance(item, (Freeze, Thaw)):
                if self._freezer is None:
                    self._send(
                        ErrorMessage(item.id, ErrorCode.UNSUPPORTED, "this client does not freeze"), deadline
                    )
                else:
                    self._send(self._freezer.handle(item), deadline)
                continue
            return item

    def _new_id(self) -> str:
        self._counter += 1
        return f"{self._id_prefix}-{self._counter}"

    def _deadline(self, timeout: float | None, default: float) -> tuple[float, float]:
        seconds = default if timeout is None else timeout
        if not seconds > 0:
            raise InvalidArgument(f"timeout must be positive, not {seconds!r}")
        return time.monotonic() + seconds, seconds

    def _request(
        self, msg: Backup | Restore | Status | ListSnapshots | See | Release, deadline: float
    ) -> Message:
        """Send ``msg`` (which carries a fresh id) and return the first reply with that id."""
        self._connect(deadline)
        self._send(msg, deadline)
        rid = msg.id
        reply_deadline = min(deadline, time.monotonic() + self.config.reply_timeout)
        while True:
            try:
                reply = self._receive(reply_deadline)
            except HostNotConnected as e:
                raise HostNotConnected(f"the host went away before answering {msg.TYPE}: {e}") from e
            if reply is None:
                self._after_timeout()
                raise TimedOut(f"the host did not answer the {msg.TYPE} request in time")
            if getattr(reply, "id", None) == rid and not isinstance(reply, (Freeze, Thaw)):
                return reply
            log.debug("not the reply to %s: %s", rid, reply)

    # --- the calls ------------------------------------------------------------------------

    def backup(
        self,
        targets: Sequence[str] | str | None = None,
        destination: str | None = None,
        policy: Policy | str | None = None,
        *,
        quiesce: bool | None = None,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        paths: Sequence[str] | None = None,
        partition: int | None = None,
    ) -> JobResult:
        """Back up ``targets`` (disk serials, or "all"; default from the configuration) and
        wait for the result.  With ``paths`` (inside the file system on ``partition`` of the one
        target disk: see ``guest_shim.paths.backup_paths``), only those paths, as a file-level
        snapshot.  Raises Failed if the job failed."""
        dflt = self.config.defaults
        wire_targets: str | tuple[str, ...]
        if targets is None:
            wire_targets = dflt.targets
        elif isinstance(targets, str):
            wire_targets = targets if targets == ALL else (targets,)
        else:
            wire_targets = tuple(targets)
        deadline, seconds = self._deadline(timeout, self.config.job_timeout)
        msg = _build(
            Backup,
            self._new_id(),
            wire_targets,
            dflt.policy if policy is None else policy,
            dflt.destination if destination is None else destination,
            dflt.quiesce if quiesce is None else quiesce,
            None if paths is None else tuple(paths),
            partition,
        )
        return self._run_job(msg, deadline, seconds, on_progress)

    def restore(
        self,
        target: str,
        snapshot: str = LATEST,
        *,
        mode: RestoreMode | str = RestoreMode.NEW_DISK,
        destination: str | None = None,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> JobResult:
        """Restore disk ``target`` from ``snapshot`` (an id or "latest").  With the default mode
        ``new-disk`` the host attaches the restored image as a new disk: its serial is
        ``result.disks[0].new_serial``.  ``in-place`` is refused while the VM runs (Rejected)."""
        deadline, seconds = self._deadline(timeout, self.config.job_timeout)
        dest = self.config.defaults.destination if destination is None else destination
        msg = _build(Restore, self._new_id(), target, snapshot, mode, dest)
        return self._run_job(msg, deadline, seconds, on_progress)

    def status(self, job: str, *, timeout: float | None = None) -> JobStatus:
        """Where ``job`` is.  A finished job's status carries its result (also a failed one)."""
        deadline, _ = self._deadline(timeout, self.config.connect_timeout + self.config.reply_timeout)
        msg = _build(Status, self._new_id(), job)
        reply = self._request(msg, deadline)
        if isinstance(reply, Progress):
            return JobStatus(reply.job, reply.state.value, reply.done, reply.total)
        if isinstance(reply, Result):
            return _finished(reply)
        raise self._unexpected(msg, reply)

    def list_snapshots(
        self, target: str | None = None, *, destination: str | None = None, timeout: float | None = None
    ) -> SnapshotList:
        """The snapshots of this VM's disks (of disk ``target`` only, if given), newest first."""
        deadline, _ = self._deadline(timeout, self.config.connect_timeout + self.config.reply_timeout)
        dest = self.config.defaults.destination if destination is None else destination
        msg = _build(ListSnapshots, self._new_id(), target, dest)
        reply = self._request(msg, deadline)
        if isinstance(reply, Snapshots):
            return SnapshotList(reply.snapshots, reply.truncated)
        raise self._unexpected(msg, reply)

    def see(
        self,
        target: str,
        snapshot: str = LATEST,
        *,
        destination: str | None = None,
        timeout: float | None = None,
        partition: int | None = None,
    ) -> SeenSnapshot:
        """Ask the host to attach ``snapshot`` (an id or "latest") of this VM's disk ``target`` as
        a read-only disk; its serial is ``.serial``.  With ``partition``, a file-level snapshot of
        that partition's file system (its archive).  Give it back with :meth:`release`."""
        deadline, _ = self._deadline(timeout, self.config.connect_timeout + self.config.reply_timeout)
        dest = self.config.defaults.destination if destination is None else destination
        msg = _build(See, self._new_id(), target, snapshot, dest, partition)
        reply = self._request(msg, deadline)
        if isinstance(reply, Seeing):
            return SeenSnapshot(reply.target, reply.snapshot, reply.serial, reply.bytes, reply.expires)
        raise self._unexpected(msg, reply)

    def release(self, serial: str, *, timeout: float | None = None) -> None:
        """Give the read-only disk ``serial`` back (unmount it first: the host unplugs it)."""
        deadline, _ = self._deadline(timeout, self.config.connect_timeout + self.config.reply_timeout)
        msg = _build(Release, self._new_id(), serial)
        reply = self._request(msg, deadline)
        if not isinstance(reply, Released):
            raise self._unexpected(msg, reply)

    def _rejoin(self, job: str, deadline: float) -> RequestId:
        """The VM moved for ``job``: wait (until ``deadline``) for a host to connect again, resync and
        ask for the job's status; return the status request's id."""
        assert self._port is not None
        log.info("the host moves this VM for job %s; waiting for it to come back", job)
        if not self._port.wait_connected(deadline):
            self._after_timeout()
            raise TimedOut(f"job {job}: the host did not come back after moving this VM", job=job)
        self._sync(deadline)
        self._send(Hello(SHIM_VERSION, Role.CLIENT), deadline)
        self._synced = True
        status = Status(self._new_id(), job)
        self._send(status, deadline)
        return status.id

    def _unexpected(self, msg: Message, reply: Message) -> ShimError:
        if isinstance(reply, ErrorMessage):
            if reply.code == ErrorCode.NOT_CONNECTED:
                return HostNotConnected(reply.message)
            return Rejected(reply.code.value, reply.message, retry_after=reply.retry_after)
        return ProtocolError(f"the host answered {msg.TYPE} with {reply.TYPE}")

    def _run_job(
        self, msg: Backup | Restore, deadline: float, seconds: float, on_progress: ProgressCallback | None
    ) -> JobResult:
        reply = self._request(msg, deadline)
        if not isinstance(reply, Accepted):
            raise self._unexpected(msg, reply)
        job = reply.job
        log.info("%s accepted as job %s", msg.TYPE, job)
        return self._await_result(job, msg.id, deadline, seconds, on_progress)

    def _await_result(
        self,
        job: str,
        rid: RequestId,
        deadline: float,
        seconds: float,
        on_progress: ProgressCallback | None,
    ) -> JobResult:
        ids: list[RequestId] = [rid]  # the request's id and those of our status requests
        last_heard = time.monotonic()
        moving = False  # the host announced it moves this VM: its hang-up is expected
        while True:
            try:
                msg = self._receive(min(deadline, last_heard + self.config.status_interval))
            except HostNotConnected as e:
                if not moving or self.via_serve:
                    raise HostNotConnected(
                        f"the host went away while job {job} ran ({e}); it may still finish: "
                        f"ask `hyperback-shim status {job}` later",
                        job=job,
                    ) from e
                ids.append(self._rejoin(job, deadline))
                moving = False
                last_heard = time.monotonic()
                continue
            now = time.monotonic()
            if msg is None:
                if now >= deadline:
                    self._after_timeout()
                    raise TimedOut(f"job {job} did not finish within {seconds:g} s", job=job)
                # Silence: resynchronise, then ask (recovers a result lost in the channel).
                log.info("no word from the host on job %s for %g s; asking", job, self.config.status_interval)
                try:
                    self._sync(min(deadline, now + self.config.reply_timeout))
                except TimedOut as e:
                    raise TimedOut(f"the host stopped answering while job {job} ran", job=job) from e
                except HostNotConnected as e:
                    raise HostNotConnected(f"the host went away while job {job} ran: {e}", job=job) from e
                self._synced = True
                status = Status(self._new_id(), job)
                ids.append(status.id)
                self._send(status, deadline)
                last_heard = now
                continue
            last_heard = now
            mid = getattr(msg, "id", None)
            ours = mid is not None and mid in ids
            if isinstance(msg, Result) and msg.job == job and (ours or mid is None):
                result = JobResult.from_message(msg)
                if not result.ok:
                    err = result.error
                    raise Failed(
                        err.code.value if err else "failed",
                        err.message if err else "",
                        job=job,
                        result=result,
                    )
                log.info("job %s done in %.1f s", job, result.seconds)
                return result
            if isinstance(msg, Progress) and msg.job == job:
                moving = moving or msg.state == JobState.MOVING
                if on_progress is not None:
                    on_progress(JobStatus(job, msg.state.value, msg.done, msg.total))
                continue
            if isinstance(msg, ErrorMessage) and ours:
                if msg.code == ErrorCode.NOT_CONNECTED:
                    raise HostNotConnected(
                        f"the host went away while job {job} ran ({msg.message}); "
                        f"ask `hyperback-shim status {job}` later",
                        job=job,
                    )
                if msg.code == ErrorCode.UNKNOWN_JOB:
                    raise Failed(msg.code.value, f"the host no longer knows job {job}", job=job)
                raise Failed(msg.code.value, msg.message, job=job)
            log.debug("ignoring %s while waiting for job %s", msg, job)


def _finished(msg: Result) -> JobStatus:
    result = JobResult.from_message(msg)
    return JobStatus(msg.job, "done" if msg.ok else "failed", msg.bytes, msg.bytes, result)


# --- one-call functions -----------------------------------------------------------------------


def backup(
    targets: Sequence[str] | str | None = None,
    destination: str | None = None,
    policy: Policy | str | None = None,
    *,
    quiesce: bool | None = None,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    config: ShimConfig | None = None,
) -> JobResult:
    """Back up this VM's disks ``targets`` (serials or "all") and wait for the result.

    Arguments left out come from the configuration's ``[defaults]``.  Raises HostNotConnected,
    Rejected, Failed, TimedOut or InvalidArgument (all ShimError).
    """
    with Client(config) as client:
        return client.backup(
            targets, destination, policy, quiesce=quiesce, timeout=timeout, on_progress=on_progress
        )


def restore(
    target: str,
    snapshot: str = LATEST,
    *,
    mode: RestoreMode | str = RestoreMode.NEW_DISK,
    destination: str | None = None,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    config: ShimConfig | None = None,
) -> JobResult:
    """Restore disk ``target`` from ``snapshot`` into a new disk the host attaches to this VM."""
    with Client(config) as client:
        return client.restore(
            target, snapshot, mode=mode, destination=destination, timeout=timeout, on_progress=on_progress
        )


def status(job: str, *, timeout: float | None = None, config: ShimConfig | None = None) -> JobStatus:
    """Where ``job`` is (queued, running, done, failed)."""
    with Client(config) as client:
        return client.status(job, timeout=timeout)


def list_snapshots(
    target: str | None = None,
    *,
    destination: str | None = None,
    timeout: float | None = None,
    config: ShimConfig | None = None,
) -> SnapshotList:
    """This VM's snapshots (of disk ``target`` only, if given), newest first."""
    with Client(config) as client:
        return client.list_snapshots(target, destination=destination, timeout=timeout)


def see(
    target: str,
    snapshot: str = LATEST,
    *,
    destination: str | None = None,
    timeout: float | None = None,
    config: ShimConfig | None = None,
) -> SeenSnapshot:
    """Have the host attach ``snapshot`` of this VM's disk ``target`` as a read-only disk."""
    with Client(config) as client:
        return client.see(target, snapshot, destination=destination, timeout=timeout)


def release(serial: str, *, timeout: float | None = None, config: ShimConfig | None = None) -> None:
    """Give the read-only disk ``serial`` of a seen snapshot back to the host."""
    with Client(config) as client:
        client.release(serial, timeout=timeout)
