"""The guest <-> host wire protocol, version 1: framing, message model, validation, encoding.

This module is the single definition of the format for both sides (the host agent imports it);
``docs/wire-protocol.md`` is its specification.  Stdlib only, Python 3.9+.

Contract, in short:

* A frame is one JSON object in UTF-8 on one line, at most ``MAX_FRAME`` bytes with its ``\\n``.
  A ``0xFF`` byte (``RESET``) discards the receiver's partial line.  :class:`FrameDecoder` splits a
  byte stream into lines and never buffers more than ``MAX_FRAME - 1`` bytes; a longer line is
  discarded up to its newline and reported once as :class:`FrameTooLong`.
* :func:`decode` turns one line into a message object or raises :class:`ProtocolError` (with
  ``code`` "bad-request" or "unsupported-version" and, when readable, the offending
  ``request_id``).  It never raises anything else, whatever the input.
* :func:`encode` turns a message into one frame (``bytes`` ending in ``\\n``) or raises
  :class:`MessageTooLarge`.
* Every message is a frozen dataclass that validates itself on construction, so an invalid
  message can be neither decoded nor built.  ``Message`` is the union of them; each class has
  ``TYPE`` (the wire ``type``) and ``DIRECTION``.
* Resynchronisation: the guest sends :func:`sync_frame` (``0xFF`` + ``sync``) and discards
  everything until the ``sync-ack`` with its id (:class:`Resync`); the host answers every
  ``sync`` with :func:`sync_ack_frame` (``0xFF`` + ``sync-ack``).

Why one module, at twice the length of any other: it is the protocol's one definition, read side
by side with docs/wire-protocol.md, and both sides import it; split, the framing, the message
classes and their validation would each be half a contract (QEMU's ``qmp`` keeps its message
model in one module for the same reason).
"""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeVar, Union, cast

from .errors import (
    FrameTooLong,
    MessageTooLarge,
    ProtocolError,
    RequestIdValue,
    UnsupportedVersion,
)

__all__ = [
    "ALL",
    "LATEST",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "RESET",
    "Accepted",
    "Backup",
    "ChangeDetection",
    "Check",
    "Checked",
    "Direction",
    "DiskOutcome",
    "ErrorCode",
    "ErrorInfo",
    "ErrorMessage",
    "FrameDecoder",
    "FrameTooLong",
    "Freeze",
    "Frozen",
    "Hello",
    "JobState",
    "ListSnapshots",
    "Message",
    "MessageReader",
    "MessageTooLarge",
    "Op",
    "Policy",
    "Progress",
    "ProtocolError",
    "ReleaseCause",
    "Release",
    "Released",
    "RestoreMode",
    "Restore",
    "Result",
    "Resync",
    "Role",
    "See",
    "Seeing",
    "SkipReason",
    "Skipped",
    "SnapshotInfo",
    "Snapshots",
    "Status",
    "Sync",
    "SyncAck",
    "Thaw",
    "ThawCause",
    "Thawed",
    "UnsupportedVersion",
    "check_guest_path",
    "clean_text",
    "decode",
    "encode",
    "error_reply",
    "fit_snapshots",
    "message_types",
    "new_sync_id",
    "sync_ack_frame",
    "sync_frame",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 65536  # bytes per frame, including the terminating newline
RESET = b"\xff"  # never valid in UTF-8: discards the receiver's partial line
ALL = "all"  # backup targets: every disk of the VM
LATEST = "latest"  # restore snapshot: the newest one

MAX_SAFE_INT = 2**53 - 1  # integers beyond this do not survive every JSON implementation
MAX_TEXT = 1024  # characters in an error message
MAX_PATH = 256  # characters in a reported mount point
MAX_DISKS = 64  # serials per request, outcomes per result
MAX_PATHS = 64  # paths per path-level backup
MAX_PARTITION = 128  # partitions of a disk (GPT's usual table)
MAX_FILESYSTEMS = 64  # entries in frozen/thawed lists
MAX_SNAPSHOTS = 256  # entries in a snapshots reply
MAX_SECONDS = 1e7
MAX_FREEZE_TIMEOUT = 600.0
MAX_CHECK_TIMEOUT = 600.0  # seconds a check command may run
MAX_CHECK_ARGS = 32  # words of a check command
MAX_CHECK_OUTPUT = 4096  # characters of a check command's output in ``checked``

_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SERIAL_RE = re.compile(r"[A-Za-z0-9._+:-]{1,64}")
_DESTINATION_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_VERSION_RE = re.compile(r"[A-Za-z0-9.+_-]{1,32}")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")

RequestId = RequestIdValue  # int 0..2**53-1 or a short string; replies echo it unchanged


class _StrEnum(str, enum.Enum):  # noqa: UP042 (enum.StrEnum is Python 3.11+; the shim runs on 3.9)
    """A string-valued enum whose str() is its value on every Python version."""

    def __str__(self) -> str:
        return str(self.value)


class Direction(enum.Enum):
    """Who sends a message type."""

    TO_HOST = "to-host"
    TO_GUEST = "to-guest"
    BOTH = "both"


class Policy(_StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"
    DIFFERENTIAL = "differential"


class RestoreMode(_StrEnum):
    NEW_DISK = "new-disk"  # restore into a new image, hot-plugged as an additional disk
    IN_PLACE = "in-place"  # overwrite the disk: refused while the VM runs


class ReleaseCause(_StrEnum):
    GUEST = "guest"  # the guest sent release
    TIME_LIMIT = "time-limit"  # the host's time limit for seeing a snapshot passed
    HOST = "host"  # the host agent stopped, or its operator released it


class Role(_StrEnum):
    CLIENT = "client"  # an application (or the CLI) that owns the port for one conversation
    SERVE = "serve"  # hyperback-shim serve


class Op(_StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"


class JobState(_StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    MOVING = "moving"  # the host is about to move the VM for the job: the channel drops for a while


class ChangeDetection(_StrEnum):
    FULL_READ = "full-read"  # every block read and hashed
    ALLOCATION_MAP = "allocation-map"  # only allocated extents read
    DIRTY_BITMAP = "dirty-bitmap"  # only blocks changed since the previous checkpoint read


class ThawCause(_StrEnum):
    HOST = "host"  # the host sent thaw
    WATCHDOG = "watchdog"  # the freeze timeout passed
    SHUTDOWN = "shutdown"  # the guest process stopped
    DISCONNECT = "disconnect"  # the host went away


class SkipReason(_StrEnum):
    UNKNOWN_DISK = "unknown-disk"
    READ_ONLY = "read-only"
    NOT_FREEZABLE = "not-freezable"
    ALREADY_FROZEN = "already-frozen"
    UNREACHABLE = "unreachable"


class ErrorCode(_StrEnum):
    BAD_REQUEST = "bad-request"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNSUPPORTED = "unsupported"
    UNKNOWN_DISK = "unknown-disk"
    UNKNOWN_DESTINATION = "unknown-destination"
    UNKNOWN_JOB = "unknown-job"
    UNKNOWN_SNAPSHOT = "unknown-snapshot"
    RATE_LIMITED = "rate-limited"
    QUOTA = "quota"
    BUSY = "busy"
    FAILED = "failed"
    TIMEOUT = "timeout"
    FREEZE_FAILED = "freeze-failed"
    NOT_CONNECTED = "not-connected"


# --- value checks: each takes the raw value and a location for the message ------------------


def _bad(where: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{where}: {problem}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_pattern(value: object, where: str, rx: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"must be a string ({what})")
    if not rx.fullmatch(value):
        raise _bad(where, f"{_show(value)} is not {what}")
    return value


def _show(value: str, limit: int = 40) -> str:
    """A value quoted for an error message, short and free of control characters."""
    return repr(clean_text(value, limit))


def check_request_id(value: object, where: str = "id") -> RequestId:
    """A request id: an integer 0..2**53-1 or a string of 1..64 of [A-Za-z0-9._:-]."""
    if _is_int(value):
        assert isinstance(value, int)
        if 0 <= value <= MAX_SAFE_INT:
            return value
        raise _bad(where, "integer out of range 0..2**53-1")
    return _check_pattern(value, where, _ID_RE, "a request id (1..64 of [A-Za-z0-9._:-])")


def _check_optional_request_id(value: object, where: str = "id") -> RequestId | None:
    return None if value is None else check_request_id(value, where)


def _check_sync_id(value: object, where: str = "id") -> int:
    if not _is_int(value):
        raise _bad(where, "must be an integer")
    assert isinstance(value, int)
    if not 0 <= value <= MAX_SAFE_INT:
        raise _bad(where, "integer out of range 0..2**53-1")
    return value


def check_job_id(value: object, where: str = "job") -> str:
    return _check_pattern(value, where, _ID_RE, "a job id (1..64 of [A-Za-z0-9._:-])")


def check_serial(value: object, where: str = "serial") -> str:
    return _check_pattern(value, where, _SERIAL_RE, "a disk serial (1..64 of [A-Za-z0-9._+:-])")


def check_destination(value: object, where: str = "destination") -> str | None:
    if value is None:
        return None
    return _check_pattern(value, where, _DESTINATION_RE, "a destination name ([a-z0-9][a-z0-9_-]{0,31})")


def check_snapshot_id(value: object, where: str = "snapshot", *, allow_latest: bool = False) -> str:
    sid = _check_pattern(value, where, _ID_RE, "a snapshot id (1..64 of [A-Za-z0-9._:-])")
    if sid == LATEST and not allow_latest:
        raise _bad(where, f"{LATEST!r} is reserved and names no snapshot")
    return sid


def _check_optional_snapshot_id(value: object, where: str) -> str | None:
    return None if value is None else check_snapshot_id(value, where)


def _check_version(value: object, where: str) -> str:
    return _check_pattern(value, where, _VERSION_RE, "a version (1..32 of [A-Za-z0-9.+_-])")


def _check_text(value: object, where: str, limit: int = MAX_TEXT, min_len: int = 0) -> str:
    if not isinstance(value, str):
        raise _bad(where, "must be a string")
    if not min_len <= len(value) <= limit:
        raise _bad(where, f"length {len(value)} outside {min_len}..{limit}")
    if _CONTROL_RE.search(value):
        raise _bad(where, "contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(where, "contains a lone surrogate") from None
    return value


def _check_path(value: object, where: str) -> str:
    return _check_text(value, where, MAX_PATH, 1)


def check_guest_path(value: object, where: str = "path") -> str:
    """A path inside a guest's file system, in its one plain form: absolute, no empty, ``.`` or
    ``..`` component, no trailing ``/`` (except ``/`` itself), at most ``MAX_PATH`` characters."""
    path = _check_path(value, where)
    parts = path.split("/")[1:]
    if not path.startswith("/") or (path != "/" and any(p in ("", ".", "..") for p in parts)):
        raise _bad(where, f"{_show(path)} is not a plain absolute path (no '//', '.', '..' or trailing '/')")
    return path


def _check_partition(value: object, where: str) -> int:
    number = _check_count(value, where)
    if number > MAX_PARTITION:
        raise _bad(where, f"out of range 0..{MAX_PARTITION}")
    return number


def _check_count(value: object, where: str) -> int:
    if not _is_int(value):
        raise _bad(where, "must be an integer")
    assert isinstance(value, int)
    if not 0 <= value <= MAX_SAFE_INT:
        raise _bad(where, "out of range 0..2**53-1")
    return value


def _check_seconds(value: object, where: str, high: float = MAX_SECONDS, positive: bool = False) -> float:
    if not _is_number(value):
        raise _bad(where, "must be a number")
    assert isinstance(value, (int, float))
    number = float(value)
    if not math.isfinite(number) or number < 0 or number > high or (positive and number == 0):
        low = "0 (exclusive)" if positive else "0"
        raise _bad(where, f"out of range {low}..{high:g}")
    return number


def _check_optional_seconds(value: object, where: str) -> float | None:
    return None if value is None else _check_seconds(value, where)


def _check_bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "must be true or false")
    return value


_E = TypeVar("_E", bound=enum.Enum)


def _check_enum(cls: type[_E], value: object, where: str) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if member.value == value:
                return member
    allowed = ", ".join(str(m.value) for m in cls)
    shown = _show(value) if isinstance(value, str) else type(value).__name__
    raise _bad(where, f"{shown} is not one of: {allowed}")


_T = TypeVar("_T")


def _check_array(
    value: object,
    where: str,
    item: Any,
    *,
    max_len: int,
    min_len: int = 0,
    distinct: bool = False,
) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, "must be an array")
    if not min_len <= len(value) <= max_len:
        raise _bad(where, f"{len(value)} entries, not {min_len}..{max_len}")
    out = tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
    if distinct and len(set(out)) != len(out):
        raise _bad(where, "entries are not distinct")
    return out


def _check_targets(value: object, where: str) -> str | tuple[str, ...]:
    if value == ALL and isinstance(value, str):
        return ALL
    if isinstance(value, str):
        raise _bad(where, f'must be "{ALL}" or an array of serials, not a string')
    return _check_array(value, where, check_serial, max_len=MAX_DISKS, min_len=1, distinct=True)


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` made valid as wire text: control characters and lone surrogates replaced by
    "?", cut to ``limit`` characters (ending in "..." when cut)."""
    text = _CONTROL_RE.sub("?", value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> "?"
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..." if limit >= 3 else text[:limit]
    return text


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# --- nested value objects ---------------------------------------------------------------------


class _Value:
    """Base of the nested objects (error-info, disk-outcome, skipped, snapshot-info)."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = _wire_value(value)
        return out


_V = TypeVar("_V", bound=_Value)


def _coerce_value(cls: type[_V], value: object, where: str) -> _V:
    """A nested object from its wire form (a dict), or ``value`` itself if already built."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _bad(where, "must be an object")
    kwargs = _members(cls, value, where)
    try:
        return cls(**kwargs)
    except ProtocolError as e:
        raise _bad(where, e.message) from None


def _members(cls: type, obj: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The members of ``obj`` as keyword arguments of dataclass ``cls``: unknown and missing
    members are errors (version 1 is closed)."""
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in obj if k not in known and k not in skip]
    if unknown:
        raise _bad(where, f"unknown member {_show(sorted(unknown)[0])}")
    missing = [
        name
        for name, f in known.items()
        if name not in obj and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise _bad(where, f"missing member {missing[0]!r}")
    return {k: v for k, v in obj.items() if k in known}


def _wire_value(value: object) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    if isinstance(value, _Value):
        return value.to_wire()
    return value


@dataclass(frozen=True)
class ErrorInfo(_Value):
    """``{code, message}``: why a job failed (inside ``result``)."""

    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        _set(self, "code", _check_enum(ErrorCode, self.code, "code"))
        _set(self, "message", _check_text(self.message, "message"))


@dataclass(frozen=True)
class DiskOutcome(_Value):
    """What a job did to one disk (see ``result`` in the spec)."""

    serial: str
    bytes: int
    snapshot: str | None = None
    change_detection: ChangeDetection | None = None
    new_serial: str | None = None

    def __post_init__(self) -> None:
        check_serial(self.serial, "serial")
        _check_count(self.bytes, "bytes")
        _check_optional_snapshot_id(self.snapshot, "snapshot")
        if self.change_detection is not None:
            _set(
                self,
                "change_detection",
                _check_enum(ChangeDetection, self.change_detection, "change_detection"),
            )
        if self.new_serial is not None:
            check_serial(self.new_serial, "new_serial")


@dataclass(frozen=True)
class Skipped(_Value):
    """A file system (or, for ``unknown-disk``, a serial) a freeze left alone, and why."""

    name: str
    reason: SkipReason

    def __post_init__(self) -> None:
        _check_path(self.name, "name")
        _set(self, "reason", _check_enum(SkipReason, self.reason, "reason"))


@dataclass(frozen=True)
class SnapshotInfo(_Value):
    """One snapshot in a ``snapshots`` reply. ``bytes`` is what its backup read from this disk,
    never what the repository stored: that depends on other VMs' data."""

    id: str
    serial: str
    created: float
    policy: Policy
    bytes: int
    destination: str
    partition: int | None = None  # present: a backup of paths of that partition's file system

    def __post_init__(self) -> None:
        check_snapshot_id(self.id, "id")
        check_serial(self.serial, "serial")
        _set(self, "created", _check_seconds(self.created, "created", high=1e11))
        _set(self, "policy", _check_enum(Policy, self.policy, "policy"))
        _check_count(self.bytes, "bytes")
        if check_destination(self.destination, "destination") is None:
            raise _bad("destination", "must be a destination name")
        if self.partition is not None:
            _check_partition(self.partition, "partition")


# --- messages ---------------------------------------------------------------------------------


class _Message:
    """Base of every message: ``TYPE`` is the wire type, ``DIRECTION`` who sends it."""

    TYPE: ClassVar[str]
    DIRECTION: ClassVar[Direction]
    IS_REQUEST: ClassVar[bool] = False  # answered with a reply carrying its id

    def to_wire(self) -> dict[str, Any]:
        """The message as a JSON-ready dict: ``v`` and ``type`` first, then the members in
        declaration order; optional members that are None are left out."""
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = _wire_value(value)
        return out


@dataclass(frozen=True)
class Sync(_Message):
    """guest -> host: start of resynchronisation (always preceded by 0xFF)."""

    TYPE: ClassVar[str] = "sync"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: int

    def __post_init__(self) -> None:
        _check_sync_id(self.id)


@dataclass(frozen=True)
class SyncAck(_Message):
    """host -> guest: the sync with this id is answered; everything before it was stale."""

    TYPE: ClassVar[str] = "sync-ack"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: int

    def __post_init__(self) -> None:
        _check_sync_id(self.id)


@dataclass(frozen=True)
class Hello(_Message):
    """guest -> host, after every sync: the shim's version and role (no host name)."""

    TYPE: ClassVar[str] = "hello"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST

    shim: str
    role: Role

    def __post_init__(self) -> None:
        _check_version(self.shim, "shim")
        _set(self, "role", _check_enum(Role, self.role, "role"))


@dataclass(frozen=True)
class Backup(_Message):
    """guest -> host: back up ``targets`` (serials, or ``"all"``); with ``paths``, only those paths
    of the file system on ``partition`` (0: the disk formatted whole) of the one target disk."""

    TYPE: ClassVar[str] = "backup"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    targets: str | tuple[str, ...]
    policy: Policy
    destination: str | None = None
    quiesce: bool = True
    paths: tuple[str, ...] | None = None
    partition: int | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id)
        _set(self, "targets", _check_targets(self.targets, "targets"))
        _set(self, "policy", _check_enum(Policy, self.policy, "policy"))
        check_destination(self.destination)
        _check_bool(self.quiesce, "quiesce")
        if self.paths is None:
            if self.partition is not None:
                raise _bad("partition", "only a backup of paths names a partition")
            return
        if self.targets == ALL or len(self.targets) != 1:
            raise _bad("targets", "a backup of paths names exactly one disk")
        _set(self, "paths", _check_array(self.paths, "paths", check_guest_path, max_len=MAX_PATHS,
                                         min_len=1, distinct=True))
        _set(self, "partition", _check_partition(0 if self.partition is None else self.partition,
                                                 "partition"))


@dataclass(frozen=True)
class Restore(_Message):
    """guest -> host: restore ``target`` from ``snapshot`` (an id or ``"latest"``)."""

    TYPE: ClassVar[str] = "restore"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    target: str
    snapshot: str
    mode: RestoreMode = RestoreMode.NEW_DISK
    destination: str | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_serial(self.target, "target")
        check_snapshot_id(self.snapshot, "snapshot", allow_latest=True)
        _set(self, "mode", _check_enum(RestoreMode, self.mode, "mode"))
        check_destination(self.destination)


@dataclass(frozen=True)
class Status(_Message):
    """guest -> host: how is ``job`` doing?"""

    TYPE: ClassVar[str] = "status"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    job: str

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_job_id(self.job)


@dataclass(frozen=True)
class ListSnapshots(_Message):
    """guest -> host: list this VM's snapshots (of one disk with ``target``)."""

    TYPE: ClassVar[str] = "list"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    target: str | None = None
    destination: str | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id)
        if self.target is not None:
            check_serial(self.target, "target")
        check_destination(self.destination)


@dataclass(frozen=True)
class See(_Message):
    """guest -> host: show ``snapshot`` (an id or ``"latest"``) of this VM's disk ``target`` as
    a read-only disk (section 5.6); with ``partition``, one of the disk's file-level snapshots of
    that partition's file system instead (its archive, section 5.7)."""

    TYPE: ClassVar[str] = "see"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    target: str
    snapshot: str
    destination: str | None = None
    partition: int | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_serial(self.target, "target")
        check_snapshot_id(self.snapshot, "snapshot", allow_latest=True)
        check_destination(self.destination)
        if self.partition is not None:
            _check_partition(self.partition, "partition")


@dataclass(frozen=True)
class Release(_Message):
    """guest -> host: detach the read-only disk ``serial`` a ``see`` attached."""

    TYPE: ClassVar[str] = "release"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    serial: str

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_serial(self.serial, "serial")


@dataclass(frozen=True)
class Frozen(_Message):
    """guest -> host: reply to ``freeze``: these file systems are frozen, those were skipped."""

    TYPE: ClassVar[str] = "frozen"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST

    id: RequestId
    job: str
    filesystems: tuple[str, ...]
    skipped: tuple[Skipped, ...]

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_job_id(self.job)
        _set(
            self,
            "filesystems",
            _check_array(self.filesystems, "filesystems", _check_path, max_len=MAX_FILESYSTEMS),
        )
        _set(
            self,
            "skipped",
            _check_array(
                self.skipped,
                "skipped",
                lambda v, w: _coerce_value(Skipped, v, w),
                max_len=MAX_FILESYSTEMS,
            ),
        )


@dataclass(frozen=True)
class Thawed(_Message):
    """guest -> host: reply to ``thaw`` (``by`` host), or unsolicited with ``id`` None."""

    TYPE: ClassVar[str] = "thawed"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST

    id: RequestId | None
    job: str
    filesystems: tuple[str, ...]
    by: ThawCause

    def __post_init__(self) -> None:
        _check_optional_request_id(self.id)
        check_job_id(self.job)
        _set(
            self,
            "filesystems",
            _check_array(self.filesystems, "filesystems", _check_path, max_len=MAX_FILESYSTEMS),
        )
        _set(self, "by", _check_enum(ThawCause, self.by, "by"))


@dataclass(frozen=True)
class ErrorMessage(_Message):
    """either direction: the request ``id`` (None if unreadable) is rejected with ``code``."""

    TYPE: ClassVar[str] = "error"
    DIRECTION: ClassVar[Direction] = Direction.BOTH

    id: RequestId | None
    code: ErrorCode
    message: str
    retry_after: float | None = None

    def __post_init__(self) -> None:
        _check_optional_request_id(self.id)
        _set(self, "code", _check_enum(ErrorCode, self.code, "code"))
        _check_text(self.message, "message")
        _set(self, "retry_after", _check_optional_seconds(self.retry_after, "retry_after"))


@dataclass(frozen=True)
class Accepted(_Message):
    """host -> guest: the backup/restore ``id`` is queued as ``job``."""

    TYPE: ClassVar[str] = "accepted"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId
    job: str

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_job_id(self.job)


@dataclass(frozen=True)
class Progress(_Message):
    """host -> guest: ``done`` of ``total`` bytes (total 0: unknown); unsolicited (``id``
    None) or the reply to ``status``."""

    TYPE: ClassVar[str] = "progress"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId | None
    job: str
    state: JobState
    done: int
    total: int

    def __post_init__(self) -> None:
        _check_optional_request_id(self.id)
        check_job_id(self.job)
        _set(self, "state", _check_enum(JobState, self.state, "state"))
        _check_count(self.done, "done")
        _check_count(self.total, "total")
        if self.total and self.done > self.total:
            raise _bad("done", "exceeds total")


@dataclass(frozen=True)
class Result(_Message):
    """host -> guest: a finished job. ``error`` is set if and only if ``ok`` is false."""

    TYPE: ClassVar[str] = "result"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId | None
    job: str
    op: Op
    ok: bool
    disks: tuple[DiskOutcome, ...]
    bytes: int
    seconds: float
    quiesced: bool = False
    error: ErrorInfo | None = None

    def __post_init__(self) -> None:
        _check_optional_request_id(self.id)
        check_job_id(self.job)
        _set(self, "op", _check_enum(Op, self.op, "op"))
        _check_bool(self.ok, "ok")
        _set(
            self,
            "disks",
            _check_array(
                self.disks, "disks", lambda v, w: _coerce_value(DiskOutcome, v, w), max_len=MAX_DISKS
            ),
        )
        _check_count(self.bytes, "bytes")
        _set(self, "seconds", _check_seconds(self.seconds, "seconds"))
        _check_bool(self.quiesced, "quiesced")
        if self.error is not None:
            _set(self, "error", _coerce_value(ErrorInfo, self.error, "error"))
        if self.ok and self.error is not None:
            raise _bad("error", "present although ok is true")
        if not self.ok and self.error is None:
            raise _bad("error", "missing although ok is false")


@dataclass(frozen=True)
class Snapshots(_Message):
    """host -> guest: reply to ``list``, newest first."""

    TYPE: ClassVar[str] = "snapshots"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId
    snapshots: tuple[SnapshotInfo, ...]
    truncated: bool

    def __post_init__(self) -> None:
        check_request_id(self.id)
        _set(
            self,
            "snapshots",
            _check_array(
                self.snapshots,
                "snapshots",
                lambda v, w: _coerce_value(SnapshotInfo, v, w),
                max_len=MAX_SNAPSHOTS,
            ),
        )
        _check_bool(self.truncated, "truncated")


@dataclass(frozen=True)
class Seeing(_Message):
    """host -> guest: reply to ``see``: snapshot ``snapshot`` of disk ``target`` is attached as
    the read-only disk ``serial`` of ``bytes`` bytes until ``expires`` (Unix time)."""

    TYPE: ClassVar[str] = "seeing"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId
    target: str
    snapshot: str
    serial: str
    bytes: int
    expires: float

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_serial(self.target, "target")
        check_snapshot_id(self.snapshot, "snapshot")
        check_serial(self.serial, "serial")
        _check_count(self.bytes, "bytes")
        _set(self, "expires", _check_seconds(self.expires, "expires", high=1e11))


@dataclass(frozen=True)
class Released(_Message):
    """host -> guest: the read-only disk ``serial`` is detached; the reply to ``release``, or
    unsolicited (``id`` None) when the host detached it by itself."""

    TYPE: ClassVar[str] = "released"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST

    id: RequestId | None
    serial: str
    by: ReleaseCause

    def __post_init__(self) -> None:
        _check_optional_request_id(self.id)
        check_serial(self.serial, "serial")
        _set(self, "by", _check_enum(ReleaseCause, self.by, "by"))


@dataclass(frozen=True)
class Freeze(_Message):
    """host -> guest: freeze the file systems on ``disks`` for at most ``timeout`` seconds."""

    TYPE: ClassVar[str] = "freeze"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    job: str
    disks: tuple[str, ...]
    timeout: float

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_job_id(self.job)
        _set(
            self,
            "disks",
            _check_array(self.disks, "disks", check_serial, max_len=MAX_DISKS, min_len=1, distinct=True),
        )
        _set(
            self,
            "timeout",
            _check_seconds(self.timeout, "timeout", high=MAX_FREEZE_TIMEOUT, positive=True),
        )


@dataclass(frozen=True)
class Thaw(_Message):
    """host -> guest: thaw what the freeze of ``job`` froze."""

    TYPE: ClassVar[str] = "thaw"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    job: str

    def __post_init__(self) -> None:
        check_request_id(self.id)
        check_job_id(self.job)


@dataclass(frozen=True)
class Check(_Message):
    """host -> guest: are you there (no ``command``), or run this check command (argv, no shell)
    for at most ``timeout`` seconds, if this guest allows it (its ``check_commands``)."""

    TYPE: ClassVar[str] = "check"
    DIRECTION: ClassVar[Direction] = Direction.TO_GUEST
    IS_REQUEST: ClassVar[bool] = True

    id: RequestId
    timeout: float
    command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_request_id(self.id)
        _set(self, "timeout", _check_seconds(self.timeout, "timeout", high=MAX_CHECK_TIMEOUT, positive=True))
        if self.command is not None:
            _set(
                self,
                "command",
                _check_array(
                    self.command,
                    "command",
                    lambda v, w: _check_text(v, w, MAX_TEXT, 1),
                    max_len=MAX_CHECK_ARGS,
                    min_len=1,
                ),
            )


@dataclass(frozen=True)
class Checked(_Message):
    """guest -> host: reply to ``check``.  ``exit`` is the command's exit status (None: no command
    ran, or it was killed at its timeout); ``output`` the end of what it printed."""

    TYPE: ClassVar[str] = "checked"
    DIRECTION: ClassVar[Direction] = Direction.TO_HOST

    id: RequestId
    ok: bool
    exit: int | None = None
    output: str = ""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_request_id(self.id)
        _check_bool(self.ok, "ok")
        if self.exit is not None and (not _is_int(self.exit) or not -255 <= self.exit <= 255):
            raise _bad("exit", "must be an integer from -255 to 255")
        _check_text(self.output, "output", MAX_CHECK_OUTPUT)
        _set(self, "seconds", _check_seconds(self.seconds, "seconds"))


Message = Union[  # noqa: UP007 (a runtime alias: Python 3.9 has no X | Y)
    Sync,
    SyncAck,
    Hello,
    Backup,
    Restore,
    Status,
    ListSnapshots,
    Frozen,
    Thawed,
    ErrorMessage,
    Accepted,
    Progress,
    Result,
    Snapshots,
    Freeze,
    Thaw,
    Check,
    Checked,
    See,
    Seeing,
    Release,
    Released,
]

_TYPES: dict[str, type[_Message]] = {
    cls.TYPE: cls
    for cls in (
        Sync,
        SyncAck,
        Hello,
        Backup,
        Restore,
        Status,
        ListSnapshots,
        Frozen,
        Thawed,
        ErrorMessage,
        Accepted,
        Progress,
        Result,
        Snapshots,
        Freeze,
        Thaw,
        Check,
        Checked,
        See,
        Seeing,
        Release,
        Released,
    )
}


def message_types() -> dict[str, type[_Message]]:
    """Wire type name -> message class, for every message of this version."""
    return dict(_TYPES)


# --- encoding and decoding --------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One frame: compact UTF-8 JSON and a newline.  Raises MessageTooLarge past MAX_FRAME."""
    try:
        text = json.dumps(msg.to_wire(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        data = text.encode("utf-8") + b"\n"
    except (ValueError, UnicodeEncodeError) as e:  # unreachable for validated messages
        raise ProtocolError(f"cannot encode {msg.TYPE}: {e}", msg_type=msg.TYPE) from e
    if len(data) > MAX_FRAME:
        raise MessageTooLarge(
            f"{msg.TYPE} message is {len(data)} bytes, more than {MAX_FRAME}", msg_type=msg.TYPE
        )
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate member {_show(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def _peek_id(obj: dict[str, Any]) -> RequestId | None:
    value = obj.get("id")
    try:
        return _check_optional_request_id(value)
    except ProtocolError:
        return None


def decode(data: bytes | str, direction: Direction | None = None) -> Message:
    """One message from one line (with or without its newline).

    ``direction``, when given, is the direction the line travelled: a message type the other
    side never sends is rejected.  Raises ProtocolError (``code`` bad-request) or its subclass
    UnsupportedVersion; nothing else, whatever the input.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) > MAX_FRAME:
            raise FrameTooLong(f"line of {len(raw)} bytes exceeds {MAX_FRAME}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"not UTF-8 (byte {e.start})") from e
    else:
        text = data
        if len(text) > MAX_FRAME:
            raise FrameTooLong(f"line of {len(text)} characters exceeds {MAX_FRAME}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except RecursionError as e:
        raise ProtocolError("JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and int() of too many digits
        raise ProtocolError(f"not JSON: {clean_text(str(e), 200)}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message must be a JSON object, not {type(obj).__name__}")
    return _from_object(obj, direction)


def _from_object(obj: dict[str, Any], direction: Direction | None) -> Message:
    rid = _peek_id(obj)
    raw_type = obj.get("type")
    msg_type = raw_type if isinstance(raw_type, str) and raw_type in _TYPES else None

    version = obj.get("v")
    if "v" not in obj:
        raise ProtocolError("missing member 'v'", request_id=rid, msg_type=msg_type)
    if not _is_int(version):
        raise ProtocolError("'v' must be an integer", request_id=rid, msg_type=msg_type)
    if version != PROTOCOL_VERSION:
        # The one shape every version keeps: an unsupported-version error.
        if raw_type == "error" and obj.get("code") == ErrorCode.UNSUPPORTED_VERSION.value:
            text = obj.get("message")
            return ErrorMessage(
                rid,
                ErrorCode.UNSUPPORTED_VERSION,
                clean_text(text if isinstance(text, str) else f"peer speaks version {version}"),
            )
        raise UnsupportedVersion(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
            version=version,
            request_id=rid,
            msg_type=msg_type,
        )
    if not isinstance(raw_type, str):
        raise ProtocolError("missing or non-string member 'type'", request_id=rid)
    if msg_type is None:
        raise ProtocolError(f"unknown message type {_show(raw_type)}", request_id=rid)
    cls = _TYPES[msg_type]
    if direction is not None and cls.DIRECTION not in (direction, Direction.BOTH):
        to = "host" if direction is Direction.TO_HOST else "guest"
        raise ProtocolError(
            f"a {msg_type} message is never sent to the {to}", request_id=rid, msg_type=msg_type
        )
    try:
        kwargs = _members(cls, obj, msg_type, skip=("v", "type"))
    except ProtocolError as e:
        raise ProtocolError(e.message, request_id=rid, msg_type=msg_type) from None
    try:
        msg = cls(**kwargs)
    except ProtocolError as e:
        raise ProtocolError(f"{msg_type}.{e.message}", request_id=rid, msg_type=msg_type) from None
    return cast(Message, msg)


def error_reply(exc: ProtocolError) -> ErrorMessage | None:
    """The ``error`` to answer a malformed line with, or None when the spec says to stay silent
    (replies, errors, and lines that cannot be read as a request)."""
    if isinstance(exc, UnsupportedVersion):
        silent = exc.msg_type is not None and not _TYPES[exc.msg_type].IS_REQUEST
        if silent:
            return None
        return ErrorMessage(
            exc.request_id,
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {clean_text(str(exc.version), 20)} is not supported; this side speaks "
            f"{PROTOCOL_VERSION}",
        )
    if exc.msg_type is None or not _TYPES[exc.msg_type].IS_REQUEST or exc.request_id is None:
        return None
    return ErrorMessage(exc.request_id, ErrorCode.BAD_REQUEST, clean_text(exc.message))


def fit_snapshots(request_id: RequestId, infos: Sequence[SnapshotInfo]) -> Snapshots:
    """A ``snapshots`` reply holding as many of ``infos`` (newest first) as fit in one frame."""
    items = tuple(infos[:MAX_SNAPSHOTS])
    truncated = len(infos) > len(items)
    while True:
        reply = Snapshots(request_id, items, truncated)
        try:
            encode(reply)
            return reply
        except MessageTooLarge:
            items = items[: max(len(items) * 9 // 10, 0)]
            truncated = True


# --- framing ----------------------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into lines (section 2 of the spec).

    ``feed`` returns, in order, each complete non-blank line (without its newline) and a
    :class:`FrameTooLong` for each line longer than ``limit - 1`` bytes; the partial line kept
    between calls never exceeds ``limit - 1`` bytes.  A 0xFF byte discards the partial line.
    """

    def __init__(self, limit: int = MAX_FRAME) -> None:
        if limit < 2:
            raise ValueError("limit must be at least 2")
        self.limit = limit
        self._buf = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        """Bytes of the partial line held now."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget the partial line (what a 0xFF byte does)."""
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | FrameTooLong]:
        out: list[bytes | FrameTooLong] = []
        for i, segment in enumerate(bytes(data).split(RESET)):
            if i:
                self.reset()
            self._feed_segment(segment, out)
        return out

    def _feed_segment(self, segment: bytes, out: list[bytes | FrameTooLong]) -> None:
        max_line = self.limit - 1
        start = 0
        while True:
            nl = segment.find(b"\n", start)
            piece = segment[start:] if nl < 0 else segment[start:nl]
            if self._discarding:
                pass
            elif len(self._buf) + len(piece) > max_line:
                self._buf.clear()
                self._discarding = True
                out.append(FrameTooLong(f"line longer than {max_line} bytes discarded"))
            else:
                self._buf += piece
            if nl < 0:
                return
            if not self._discarding and self._buf.strip(b" \t\r"):
                out.append(bytes(self._buf))
            self._buf.clear()
            self._discarding = False
            start = nl + 1


class MessageReader:
    """A FrameDecoder plus :func:`decode`: ``feed`` returns messages and ProtocolErrors (for
    lines that were dropped), in stream order, never raising."""

    def __init__(self, direction: Direction | None = None, limit: int = MAX_FRAME) -> None:
        self.direction = direction
        self.frames = FrameDecoder(limit)

    def reset(self) -> None:
        self.frames.reset()

    def feed(self, data: bytes) -> list[Message | ProtocolError]:
        out: list[Message | ProtocolError] = []
        for item in self.frames.feed(data):
            if isinstance(item, ProtocolError):
                out.append(item)
                continue
            try:
                out.append(decode(item, self.direction))
            except ProtocolError as e:
                out.append(e)
        return out


# --- resynchronisation ------------------------------------------------------------------------


def new_sync_id() -> int:
    """A random sync id, 0..2**53-1."""
    return secrets.randbelow(MAX_SAFE_INT + 1)


def sync_frame(sync_id: int) -> bytes:
    """What the guest writes to resynchronise: 0xFF, then the ``sync`` frame."""
    return RESET + encode(Sync(sync_id))


def sync_ack_frame(sync_id: int) -> bytes:
    """What the host (or serve) writes to answer a ``sync``: 0xFF, then ``sync-ack``."""
    return RESET + encode(SyncAck(sync_id))


class Resync:
    """The guest's side of one resynchronisation: ``start()`` gives the bytes to send (with a
    fresh id), ``is_ack(msg)`` tells whether ``msg`` ends it; everything else is stale."""

    def __init__(self) -> None:
        self.sync_id: int | None = None

    def start(self) -> bytes:
        self.sync_id = new_sync_id()
        return sync_frame(self.sync_id)

    def is_ack(self, msg: object) -> bool:
        return isinstance(msg, SyncAck) and self.sync_id is not None and msg.id == self.sync_id
