"""The exceptions of the guest shim: one root, converted once at the boundary.

::

    ShimError                      exit 7 unless a subclass says otherwise
     +-- ProtocolError             malformed data on the wire (code "bad-request"), exit 6
     |    +-- FrameTooLong         a line longer than MAX_FRAME (it was discarded, not buffered)
     |    +-- MessageTooLarge      a message that would encode to more than MAX_FRAME
     |    +-- UnsupportedVersion   a message with a "v" this shim does not speak
     +-- HostNotConnected          the host agent cannot be reached, or went away, exit 4
     |    +-- PortNotFound         no virtio-serial port of that name in this guest
     |    +-- PortBusy             another process has the port open (EBUSY)
     +-- Rejected                  the host (or serve) answered the request with an error, exit 3
     +-- Failed                    the job ran and failed, exit 1
     +-- TimedOut                  a deadline passed while waiting for the host, exit 5
     +-- FreezeError               FIFREEZE/FITHAW failed (the wire reply is "freeze-failed")
 +-- MountError                a seen snapshot's disk did not appear, or could not be (un)mounted
     +-- RestoreError              paths could not be restored from a file-level snapshot, exit 1
     +-- ConfigError               the configuration file or an option is wrong, exit 2
     +-- InvalidArgument           an argument is not valid on the wire (also a ValueError), exit 2

OSError from the port, the socket and the ioctls is converted where it happens, with
``raise ... from``.  ``exit_code`` is what ``hyperback-shim`` exits with (see ``guest_shim.cli``).
Stdlib only: the host imports this module through ``guest_shim.protocol``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Union

RequestIdValue = Union[int, str]  # noqa: UP007 (a runtime alias: Python 3.9 has no X | Y)


class ShimError(Exception):
    """Root of every error the guest shim raises."""

    exit_code: ClassVar[int] = 7


class ProtocolError(ShimError):
    """Data on the wire broke the protocol.

    ``code`` is the wire error code to answer with (``bad-request`` unless a subclass says
    otherwise); ``request_id`` is the offending message's id when it could be read, so that a
    reply can carry it; ``msg_type`` its type when known.
    """

    exit_code = 6
    default_code: ClassVar[str] = "bad-request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        request_id: RequestIdValue | None = None,
        msg_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.request_id = request_id
        self.msg_type = msg_type


class FrameTooLong(ProtocolError):
    """A line exceeded MAX_FRAME; it was discarded up to its newline (or a 0xFF reset)."""


class MessageTooLarge(ProtocolError):
    """Encoding this message would exceed MAX_FRAME; nothing was sent."""


class UnsupportedVersion(ProtocolError):
    """A message carried a protocol major version this shim does not speak."""

    default_code = "unsupported-version"

    def __init__(self, message: str, *, version: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.version = version


class HostNotConnected(ShimError):
    """The host agent cannot be reached now: no port, port busy, host side not connected, or
    it disconnected while a request was outstanding (``job`` is set if the job had started:
    ask ``status(job)`` later)."""

    exit_code = 4

    def __init__(self, message: str, *, job: str | None = None) -> None:
        super().__init__(message)
        self.job = job


class PortNotFound(HostNotConnected):
    """No virtio-serial port with the hyperback name exists in this guest."""


class PortBusy(HostNotConnected):
    """Another process holds the port (a virtio-serial port has one opener)."""


class Rejected(ShimError):
    """The host, or ``serve``, refused the request: ``code`` is the wire error code."""

    exit_code = 3

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Failed(ShimError):
    """The job was accepted but failed. ``result`` is the ``JobResult`` when the host sent one."""

    exit_code = 1

    def __init__(self, code: str, message: str, *, job: str | None = None, result: Any = None) -> None:
        super().__init__(f"job {job} failed: {code}: {message}" if job else f"{code}: {message}")
        self.code = code
        self.message = message
        self.job = job
        self.result = result


class TimedOut(ShimError):
    """A deadline passed waiting for the host (``job`` is set if the job had started)."""

    exit_code = 5

    def __init__(self, message: str, *, job: str | None = None) -> None:
        super().__init__(message)
        self.job = job


class FreezeError(ShimError):
    """A file system could not be frozen or thawed (``__cause__`` is the OSError)."""


class MountError(ShimError):
    """The disk of a seen snapshot did not appear in time, or could not be mounted or unmounted
    (``mount``/``umount`` said why)."""


class RestoreError(ShimError):
    """Paths could not be written from a file-level snapshot's archive (something in the way, the
    archive unreadable); what was written before stays."""

    exit_code = 1


class ConfigError(ShimError):
    """The shim's configuration (file, environment or options) is invalid."""

    exit_code = 2


class InvalidArgument(ShimError, ValueError):
    """An argument given to the library or the CLI cannot be sent (bad serial, job id, ...)."""

    exit_code = 2
