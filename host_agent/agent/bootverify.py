"""Boot verification: a snapshot is proven by booting it, in a sandbox (``hyperback verify-boot``,
and ``[[schedules]]`` with ``kind = "verify"``).

One verification, start to end (:func:`verify_boot`):

1. The snapshot is exported read-only over NBD straight from its repository
   (``storage.export.SnapshotExport``, nbdkit): nothing is restored first.
2. A throwaway qcow2 overlay over the export takes every write of the guest.
3. A transient libvirt domain made from the VM's definition (the one stored with the snapshot's
   backup when there is one, else libvirt's current one: :func:`definition_for`; ``agent.sandbox``: no network
   interface, one disk, the hyperback channel on the verifier's own socket, the serial console
   into a file) boots from the overlay.
4. Health: the guest's shim synchronises, says hello and answers ``check`` (docs/wire-protocol.md);
   then, if the operator configured one for the domain, a check command runs in the guest
   through the shim (the guest must allow it: ``check_commands``) and must exit 0.  The VM
   stopping (power off, reboot, crash), a kernel panic on the console, or no answer within the
   boot timeout fail it.
5. The verdict, its reason and the console's end are recorded on the snapshot in its repository
   (docs/repository-format.md, 5.4).  Domain, overlay, export and the run folder are removed
   whatever happened.

A sandbox that cannot be set up (nbdkit missing, libvirt refusing the definition) raises
``SandboxError`` and records nothing: the snapshot is not at fault.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import libvirt  # type: ignore[import-untyped]

from guest_shim import protocol as p
from host_agent import errors, hypervisor
from host_agent.agent import vmdefinition
from host_agent.agent.channel import GuestChannel
from host_agent.agent.destinations import AnyRepository
from host_agent.agent.sandbox import SandboxPaths, boot_disk_serial, nvram_of, sandbox_xml
from host_agent.hypervisor import Guarded
from host_agent.storage.export import SnapshotExport
from host_agent.storage.snapshot import Snapshot
from host_agent.storage.verification import MAX_CHECK_OUTPUT, MAX_REASON, CheckOutcome, Verification, one_line

log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 300.0  # seconds from the domain's start to the shim's answer
DEFAULT_CHECK_TIMEOUT = 60.0  # seconds the check command may run in the guest
ANSWER_TIMEOUT = 30.0         # seconds the shim has to answer "are you there" once it said hello
# console lines after which a boot cannot succeed: fail at once rather than at the timeout
FATAL_CONSOLE = re.compile(r"Kernel panic - not syncing[^\n]*")
SANDBOX_PREFIX = "hb-verify-"
CONSOLE_LOOKBACK = 16384  # bytes of the console's end searched for the lines a reason quotes
# console lines that say why a boot failed (kernel, initramfs, systemd)
TELLING = re.compile(r"kernel panic|gave up|alert!|does not exist|cannot|can't|unable to|failed to|"
                     r"not syncing|emergency mode|no such file|i/o error|corrupt", re.IGNORECASE)
TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")


class VerifiableRepository(Protocol):
    """Where the snapshot lives and its verdict goes (``Repository``; ``RemoteRepository``)."""

    def resolve(self, spec: str) -> Snapshot: ...

    def export_params(self) -> dict[str, str]: ...

    def record_verification(self, record: Verification, console: bytes) -> None: ...


@dataclass(frozen=True)
class BootSpec:
    """How to verify: the VM's definition and which of its disks the snapshot is."""

    definition: str                        # the VM's domain XML
    serial: str                            # the snapshot's disk, the one the sandbox boots from
    check_command: tuple[str, ...] | None = None
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    source: str = "the given definition"   # which definition it is, as the verdict names it


@dataclass(frozen=True)
class Chosen:
    """The definition a snapshot boots with, and which one it is (for the verdict and the log)."""

    xml: str
    source: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    check: CheckOutcome | None = None


def split_name(snapshot: Snapshot) -> tuple[str, str]:
    """A VM disk's snapshot name as (domain UUID or name, disk serial)."""
    domain, sep, serial = snapshot.name.partition("/")
    if not sep or "/" in serial:
        raise errors.UsageError(f"snapshot {snapshot.id} ({snapshot.name}) is not of a VM's disk "
                                "(DOMAIN/SERIAL): only those can be booted")
    return domain, serial


def current_definition(conn: Guarded, domain: str) -> str:
    """The domain's definition as libvirt holds it now (its persistent one if it has one), for
    snapshots whose backup stored none."""
    try:
        try:
            dom = conn.lookupByUUIDString(domain)
        except errors.HypervisorError:
            dom = conn.lookupByName(domain)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
        return str(dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_SECURE))
    except errors.HypervisorError as e:
        raise errors.UsageError(f"domain {domain} is not defined on this host, and the snapshot's backup "
                                "stored no definition: give the VM's domain XML (--domain-xml FILE)") from e


def definition_for(conn: Guarded, repo: AnyRepository, snapshot: Snapshot) -> Chosen:
    """The VM as it was backed up: the definition stored with the snapshot's run (read from the same
    repository, docs/repository-format.md 5.3); else, for a snapshot that carries none (or whose
    stored definition was removed), libvirt's current definition of the domain."""
    domain, _ = split_name(snapshot)
    try:
        stored = vmdefinition.stored_for(repo, snapshot)
    except errors.SnapshotNotFound as e:
        log.warning("snapshot %s: its stored definition is gone (%s); using libvirt's current one",
                    snapshot.id, e)
        stored = None
    if stored is not None:
        xml, definition = stored
        return Chosen(xml, f"the definition stored with its backup (snapshot {definition})")
    return Chosen(current_definition(conn, domain), f"libvirt's current definition of {domain}")


def spec_for(snapshot: Snapshot, definition: str, check_command: tuple[str, ...] | None = None,
             boot_timeout: float = DEFAULT_BOOT_TIMEOUT, source: str = "the given definition") -> BootSpec:
    _, serial = split_name(snapshot)
    boots_from = boot_disk_serial(definition)
    if boots_from not in (None, serial):
        log.warning("snapshot %s is of disk %s, not of the disk the VM boots from (%s): booting from it "
                    "anyway", snapshot.id, serial, boots_from)
    return BootSpec(definition, serial, check_command, boot_timeout, source=source)


async def verify_boot(repo: VerifiableRepository, spec_str: str, spec: BootSpec, conn: Guarded,
                      work_dir: Path) -> Verification:
    """Boot the snapshot in a sandbox, record the verdict on it, and return the record."""
    snapshot = await asyncio.to_thread(repo.resolve, spec_str)
    started = time.monotonic()
    run_dir = work_dir / f"{snapshot.id[:8]}-{os.urandom(3).hex()}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise errors.SandboxError(f"cannot create {run_dir}: {e.strerror}") from e
    paths = SandboxPaths(run_dir / "overlay.qcow2", run_dir / "export.sock", run_dir / "hb.sock",
                         run_dir / "console.log", run_dir / "nvram.fd" if nvram_of(spec.definition) else None)
    try:
        with _export(repo, snapshot, paths.export_socket, run_dir):
            await asyncio.to_thread(_make_overlay, paths, snapshot.size, spec.definition)
            async with _sandbox(conn, spec, snapshot, paths) as domain:
                # the boot timeout counts from the domain's start, not from the export's
                verdict = await _health(domain, paths, spec, time.monotonic())
        console = _read(paths.console)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    record = Verification(snapshot.id, datetime.now(UTC), verdict.passed, _reason(verdict, spec),
                          round(time.monotonic() - started, 1), socket.gethostname(), verdict.check)
    await asyncio.to_thread(repo.record_verification, record, console)
    log.info("snapshot %s %s boot verification: %s", snapshot.id, record.result, record.reason)
    return record


def _reason(verdict: Verdict, spec: BootSpec) -> str:
    """The verdict's reason, which always ends naming the definition booted (never cut off)."""
    note = f" [booted with {one_line(spec.source, 200)}]"
    return one_line(verdict.reason, MAX_REASON - len(note)) + note


@contextmanager
def _export(repo: VerifiableRepository, snapshot: Snapshot, socket_path: Path,
            run_dir: Path) -> Iterator[None]:
    export = SnapshotExport(repo, snapshot.id, run_dir, socket_path=socket_path)
    try:
        export.start()
    except errors.HyperbackError as e:
        raise errors.SandboxError(f"cannot export snapshot {snapshot.id}: {e}") from e
    try:
        yield
    finally:
        export.stop()


def _make_overlay(paths: SandboxPaths, size: int, definition: str) -> None:
    """The overlay (its backing named, not opened: the domain's XML gives QEMU the export), and the
    private NVRAM copy."""
    backing = f"nbd+unix:///?socket={paths.export_socket}"
    cmd = ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", backing, str(paths.overlay),
           str(size)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise errors.SandboxError("qemu-img not found: install qemu-utils") from e
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise errors.SandboxError(f"cannot create the overlay {paths.overlay}: "
                                  f"{one_line(getattr(e, 'stderr', '') or str(e))}") from e
    original = nvram_of(definition)
    if paths.nvram is not None and original is not None and original.exists():
        shutil.copyfile(original, paths.nvram)  # the guest may write its variables: never the VM's own


@asynccontextmanager
async def _sandbox(conn: Guarded, spec: BootSpec, snapshot: Snapshot,
                   paths: SandboxPaths) -> AsyncIterator[Any]:
    name = f"{SANDBOX_PREFIX}{snapshot.id[:8]}-{uuid.uuid4().hex[:6]}"
    xml = sandbox_xml(spec.definition, name=name, serial=spec.serial, snapshot=snapshot.id, paths=paths)
    (paths.console.parent / "domain.xml").write_text(xml)
    try:
        domain = await asyncio.to_thread(conn.createXML, xml, 0)
    except errors.HypervisorError as e:
        raise errors.SandboxError(f"libvirt refused the sandbox domain for snapshot {snapshot.id}: "
                                  f"{e}") from e
    log.info("booting snapshot %s in sandbox %s with %s", snapshot.id, name, spec.source)
    try:
        yield domain
    finally:
        with contextlib.suppress(errors.HypervisorError):
            await asyncio.to_thread(domain.destroy)


class _Refuse:
    """The sandbox's guest asks for nothing: whatever it asks is refused."""

    async def on_request(self, channel: GuestChannel, msg: p.Message) -> p.Message:
        return p.ErrorMessage(getattr(msg, "id", None), p.ErrorCode.UNSUPPORTED,
                              "this VM is a boot verification sandbox: it takes no backups or restores")

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None:
        pass


async def _health(domain: Any, paths: SandboxPaths, spec: BootSpec, started: float) -> Verdict:
    channel = GuestChannel(str(domain.UUIDString()), str(domain.name()), str(paths.channel), _Refuse())
    runner = asyncio.create_task(channel.run(), name=f"sandbox-channel-{domain.name()}")
    try:
        failure = await _wait_for_hello(domain, channel, paths, spec.boot_timeout, started)
        if failure is not None:
            return Verdict(False, failure)
        answered = time.monotonic() - started
        try:
            reply = await channel.check(None, ANSWER_TIMEOUT)
        except (TimeoutError, errors.ChannelClosed) as e:
            return Verdict(False, f"the shim said hello but did not answer check ({type(e).__name__})")
        if isinstance(reply, p.ErrorMessage) and reply.code is not p.ErrorCode.BAD_REQUEST:
            return Verdict(False, f"the shim answered check with {reply.code.value}: {reply.message}")
        # (bad-request: a shim older than check; it answered, which is what is asked of it)
        seen = f"the shim answered {answered:.1f} s after the domain started"
        if spec.check_command is None:
            return Verdict(True, seen)
        return await _run_check(channel, spec, seen)
    finally:
        channel.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def _wait_for_hello(domain: Any, channel: GuestChannel, paths: SandboxPaths, timeout: float,
                          started: float) -> str | None:
    """None once the shim said hello; else why the boot failed."""
    deadline = started + timeout
    while not channel.greeted.is_set():
        panic = FATAL_CONSOLE.search(_read(paths.console).decode("utf-8", "replace"))
        if panic:
            return f"{panic.group(0).strip()} ({_elapsed(started)}); console: {_console_end(paths)}"
        if not await asyncio.to_thread(_active, domain):
            return (f"the VM stopped before its shim answered (powered off, rebooted or crashed; "
                    f"{_elapsed(started)}); console: {_console_end(paths)}")
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no answer from the shim within {timeout:g} s; console: {_console_end(paths)}"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.greeted.wait(), min(1.0, left))
    return None


async def _run_check(channel: GuestChannel, spec: BootSpec, seen: str) -> Verdict:
    assert spec.check_command is not None
    command = spec.check_command
    shown = " ".join(command)
    try:
        reply = await channel.check(command, spec.check_timeout)
    except (TimeoutError, errors.ChannelClosed) as e:
        return Verdict(False, f"{seen}; check {shown!r} got no answer ({type(e).__name__})",
                       CheckOutcome(command, None, ""))
    if isinstance(reply, p.ErrorMessage):
        return Verdict(False, f"{seen}; check {shown!r} not run: {reply.message}",
                       CheckOutcome(command, None, ""))
    assert isinstance(reply, p.Checked)
    outcome = CheckOutcome(command, reply.exit, one_line(reply.output, MAX_CHECK_OUTPUT))
    if reply.ok:
        return Verdict(True, f"{seen}; check {shown!r} passed", outcome)
    status = "was killed at its timeout" if reply.exit is None else f"exited {reply.exit}"
    return Verdict(False, f"{seen}; check {shown!r} {status}: {one_line(reply.output, 300)}", outcome)


def _active(domain: Any) -> bool:
    try:
        return bool(domain.isActive())
    except errors.HypervisorError:  # a transient domain that stopped is gone
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _console_end(paths: SandboxPaths, lines: int = 3) -> str:
    """What the console says about the failure: its last lines that name one (a kernel or an
    initramfs giving up), else simply its last lines; kernel time stamps left out."""
    text = _read(paths.console)[-CONSOLE_LOOKBACK:].decode("utf-8", "replace")
    seen = [TIMESTAMP.sub("", line).strip() for line in text.splitlines()]
    seen = [line for line in seen if line]
    telling = [line for line in seen if TELLING.search(line)]
    return " | ".join((telling or seen)[-lines:]) or "(nothing)"


def _elapsed(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s after the domain started"


def connect(uri: str) -> Guarded:
    return hypervisor.connect(uri)
