"""The hypervisor's one door: libvirt is reached through here, and its errors become ours here.

::

    conn = hypervisor.connect("qemu:///system")      # HypervisorUnreachable if the daemon is not there
    dom = conn.lookupByUUIDString(uuid)               # NoDomain if it is gone
    try:
        dom.checkpointLookupByName(name)
    except errors.NoCheckpoint:
        ...

:func:`connect` and :func:`guard` hand out *guarded* libvirt objects: every method is libvirt's
own, with its arguments and results, except that a ``libvirt.libvirtError`` is raised as the
:class:`~host_agent.errors.HypervisorError` subclass its error code names (NoDomain, NoCheckpoint,
NoBackupJob, OperationInvalid; any other code as HypervisorError itself, with ``code`` set), from
the libvirt error, with libvirt's message. Connections, domains, checkpoints and snapshots that
calls return are guarded too, and guarded objects passed back into libvirt are unwrapped, so code
past this door never sees a ``libvirtError``. Flags and constants are still read from the
``libvirt`` module: they are numbers, not behaviour.

A function that takes a domain from a caller (a test, the lab) guards it first: :func:`guard` of a
guarded object is the object itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors

__all__ = ["Guarded", "connect", "guard", "qemu_monitor", "register_event_loop", "watch_lifecycle"]

_BY_CODE: dict[int, type[errors.HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: errors.NoDomain,
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT: errors.NoCheckpoint,
    libvirt.VIR_ERR_NO_DOMAIN_BACKUP: errors.NoBackupJob,
    libvirt.VIR_ERR_OPERATION_INVALID: errors.OperationInvalid,
}
_GUARDED_TYPES = (libvirt.virConnect, libvirt.virDomain, libvirt.virDomainCheckpoint,
                  libvirt.virDomainSnapshot)
_quiet_once = threading.Lock()
_quiet = False


def _typed(e: libvirt.libvirtError) -> errors.HypervisorError:
    code = int(e.get_error_code() or 0)
    return _BY_CODE.get(code, errors.HypervisorError)(str(e), code)


def _wrap(value: Any) -> Any:
    if isinstance(value, _GUARDED_TYPES):
        return Guarded(value)
    if isinstance(value, list) and value and isinstance(value[0], _GUARDED_TYPES):
        return [Guarded(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Guarded):
        return value.raw
    if isinstance(value, list) and value and isinstance(value[0], Guarded):
        return [v.raw for v in value]
    return value


class Guarded:
    """A libvirt object whose methods raise :class:`~host_agent.errors.HypervisorError`."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return _wrap(attr(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()}))
            except libvirt.libvirtError as e:
                raise _typed(e) from e

        return call

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Guarded) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"Guarded({self.raw!r})"


def guard(obj: Any) -> Guarded:
    """``obj`` (a libvirt connection, domain, ...) behind the door; a guarded object as it is."""
    return obj if isinstance(obj, Guarded) else Guarded(obj)


def qemu_monitor(dom: Any, command: str) -> str:
    """Send one QMP command (JSON text) to the domain's QEMU; its JSON reply. For what libvirt has no
    API for (host_agent.agent.volatile_bitmaps); libvirt logs the domain as "custom-monitor" tainted."""
    import libvirt_qemu  # type: ignore[import-untyped]  # the same package as libvirt

    try:
        return str(libvirt_qemu.qemuMonitorCommand(guard(dom).raw, command, 0))
    except libvirt.libvirtError as e:
        raise _typed(e) from e


def _silence_libvirt() -> None:
    """Every libvirt failure is raised as an exception and logged where it matters; libvirt's own
    handler would also print each one (an expected "domain not found" too) to stderr."""
    global _quiet
    with _quiet_once:
        if not _quiet:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _quiet = True


def connect(uri: str) -> Guarded:
    """A guarded connection to the libvirt daemon at ``uri``; HypervisorUnreachable if there is none."""
    _silence_libvirt()
    try:
        return Guarded(libvirt.open(uri))
    except libvirt.libvirtError as e:
        raise errors.HypervisorUnreachable(f"cannot connect to libvirt at {uri}: {e}; is libvirtd running?",
                                           int(e.get_error_code() or 0)) from e


_events: threading.Thread | None = None


def register_event_loop() -> None:
    """Run libvirt's own event loop in a thread of its own, before connecting (once per process;
    later calls do nothing). It delivers domain events and answers the daemon's keepalives whatever
    asyncio loop runs, or none: libvirt takes one event implementation per process, for good, and an
    asyncio one would die with its loop (a second agent in the process could not register)."""
    global _events
    if _events is not None:
        return
    _silence_libvirt()
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    _events = threading.Thread(target=run, name="libvirt-events", daemon=True)
    _events.start()


LIFECYCLE_KINDS = {libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_RESUMED: "started",
                   libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "stopped",
                   libvirt.VIR_DOMAIN_EVENT_CRASHED: "stopped"}


def watch_lifecycle(conn: Guarded, on_event: Callable[[str, str], None]) -> int:
    """Call ``on_event(uuid, "started"|"stopped"|"migrated")``, on the calling asyncio loop, on each
    lifecycle event of ``conn``'s domains; returns libvirt's callback id. Needs
    :func:`register_event_loop` first."""
    loop = asyncio.get_running_loop()

    def callback(_conn: object, dom: Any, event: int, detail: int, _opaque: object) -> None:
        kind = LIFECYCLE_KINDS.get(event)
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED:
            kind = "migrated"
        if kind:
            with contextlib.suppress(RuntimeError):  # the loop has closed: its agent is gone
                loop.call_soon_threadsafe(on_event, dom.UUIDString(), kind)

    return int(conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callback, None))
