"""Domain XML for vmlab guests, and the ``Lab`` context manager that runs them through libvirt.

::

    with Lab(workdir) as lab:
        vm = lab.start_vm("demo", disks=[Disk(path, serial="hb-disk-1")], command="...")
        sock = vm.connect_channel()          # org.hyperback.agent.0, path read from the live XML
        ...
        assert vm.wait_for_exit() == 0
    # every domain started by the lab is destroyed (and undefined) here, also on errors

Templates (``domain.xml``, ``disk.xml``, ``channel.xml``) sit beside this module and are filled with
``string.Template``; every value is XML-escaped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import socket
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

from . import guest
from .errors import (
    BootTimeout,
    ChannelError,
    GuestStopped,
    HostNotReady,
    LibvirtFailure,
    VmLabError,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
AGENT_CHANNEL = "org.hyperback.agent.0"
DEFAULT_URI = "qemu:///system"
EMULATOR = "/usr/bin/qemu-system-x86_64"
DESCRIPTION = "hyperback vmlab test guest (safe to destroy)"
# no_timer_check: on a loaded host a TCG guest's timer IRQ can miss the kernel's boot-time check,
# which then panics ("IO-APIC + timer doesn't work"); the check is meant for broken hardware.
BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "quiet", "8250.nr_uarts=1", "no_timer_check", "rdinit=/init")


def _x(value: object) -> str:
    """XML-escape text and attribute values (attributes in the templates use single quotes)."""
    return escape(str(value), {"'": "&apos;", '"': "&quot;"})


def _template(name: str) -> Template:
    return Template((HERE / name).read_text())


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk. ``serial`` shows in the guest as /sys/block/<target>/serial."""

    path: Path | str
    target: str = "vda"
    format: str = "raw"  # raw | qcow2
    serial: str | None = None
    readonly: bool = False
    cache: str | None = None  # None (QEMU default), none, writeback, writethrough, unsafe, ...

    def __post_init__(self) -> None:
        if self.format not in ("raw", "qcow2"):
            raise ValueError(f"disk format must be raw or qcow2, not {self.format!r}")
        if not re.fullmatch(r"vd[a-z]{1,2}", self.target):
            raise ValueError(f"virtio disk target must look like vda, not {self.target!r}")
        if self.serial is not None and not re.fullmatch(r"[A-Za-z0-9_.+\-]{1,20}", self.serial):
            # virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES)
            raise ValueError(f"disk serial must be 1..20 of [A-Za-z0-9_.+-], not {self.serial!r}")


@dataclass(frozen=True)
class Channel:
    """A virtio-serial channel. ``path=None`` lets libvirt place the socket (read it back with
    ``Vm.channel_path``)."""

    name: str = AGENT_CHANNEL
    path: Path | str | None = None


def render_disk(disk: Disk) -> str:
    """A ``type='block'`` disk when the path is a block device (a loop device, an LV), else a file."""
    path = Path(disk.path).resolve()
    block = path.exists() and stat.S_ISBLK(path.stat().st_mode)
    return (
        _template("disk.xml")
        .substitute(
            disk_type="block" if block else "file",
            source_attr="dev" if block else "file",
            format=_x(disk.format),
            cache_attr=f" cache='{_x(disk.cache)}'" if disk.cache else "",
            path=_x(path),
            target=_x(disk.target),
            serial_elem=f"\n      <serial>{_x(disk.serial)}</serial>" if disk.serial else "",
            readonly_elem="\n      <readonly/>" if disk.readonly else "",
        )
        .rstrip("\n")
    )


def render_channel(channel: Channel) -> str:
    return (
        _template("channel.xml")
        .substitute(
            name=_x(channel.name),
            path_attr=f" path='{_x(channel.path)}'" if channel.path else "",
        )
        .rstrip("\n")
    )


def render_domain_xml(
    name: str,
    *,
    kernel: Path | str,
    initrd: Path | str,
    cmdline: str,
    console_log: Path | str,
    disks: Sequence[Disk] = (),
    channels: Sequence[Channel] = (Channel(),),
    vcpus: int = 1,
    memory_mib: int = 512,
    hostroot: Path | str = "/",
    cpu_mode: str = "maximum",
    emulator: str = EMULATOR,
) -> str:
    """The domain XML of one vmlab guest (checked to be well-formed)."""
    if vcpus not in (1, 2):
        raise ValueError("vmlab guests have 1 or 2 vCPUs")
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise ValueError(f"duplicate disk targets: {targets}")
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate channel names: {names}")
    xml = _template("domain.xml").substitute(
        name=_x(name),
        description=_x(DESCRIPTION),
        memory_mib=int(memory_mib),
        vcpus=int(vcpus),
        kernel=_x(kernel),
        initrd=_x(initrd),
        cmdline=_x(cmdline),
        cpu_mode=_x(cpu_mode),
        emulator=_x(emulator),
        hostroot=_x(hostroot),
        disks="\n".join(render_disk(d) for d in disks),
        channels="\n".join(render_channel(c) for c in channels),
        console_log=_x(console_log),
    )
    ET.fromstring(xml)  # raises ParseError on a template bug
    return xml


def make_disk(path: Path | str, size: int, fmt: str = "raw") -> Path:
    """Create an empty (sparse) disk image of ``size`` bytes; raw or qcow2."""
    path = Path(path)
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
    elif fmt == "qcow2":
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                check=True,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError as e:
            raise HostNotReady("qemu-img not found (install qemu-utils)") from e
        except subprocess.CalledProcessError as e:
            raise VmLabError(f"qemu-img create {path}: {e.stderr.strip()}") from e
    else:
        raise ValueError(f"disk format must be raw or qcow2, not {fmt!r}")
    return path


def compose_command(command: str, cwd: Path | str | None = None, env: Mapping[str, str] | None = None) -> str:
    """A /bin/sh script running ``command`` in ``cwd`` with ``env`` added."""
    lines = []
    if cwd is not None:
        lines.append(f"cd {shlex.quote(str(cwd))} || exit 254")
    for key, value in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"bad environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(command)
    return "\n".join(lines)


def _libvirt() -> Any:
    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError as e:
        raise HostNotReady("libvirt-python is not installed in this Python") from e
    return libvirt


def _is_vmlab_domain(dom: Any) -> bool:
    libvirt = _libvirt()
    try:
        return ET.fromstring(dom.XMLDesc(0)).findtext("description") == DESCRIPTION
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise LibvirtFailure(f"XMLDesc({dom.name()}): {e}") from e


def _alive(conn: Any) -> bool:
    """Whether the daemon still answers on ``conn`` (``isAlive()`` stays true after the daemon
    closed it, until the next call fails: so make a cheap call)."""
    try:
        conn.getLibVersion()
        return True
    except Exception:  # noqa: BLE001 - a connection that cannot answer is not usable
        return False


def running_guests(conn: Any) -> list[str]:
    """Names of the running vmlab guests on ``conn`` (any Lab's, any process's)."""
    libvirt = _libvirt()
    try:
        doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"listAllDomains: {e}") from e
    return [d.name() for d in doms if _is_vmlab_domain(d)]


def destroy_stale_guests(uri: str = DEFAULT_URI) -> list[str]:
    """Destroy and undefine every vmlab guest on ``uri`` (left by a killed test run)."""
    libvirt = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HostNotReady(f"cannot reach libvirt at {uri}: {e}") from e
    try:
        gone = []
        for dom in conn.listAllDomains(0):
            if _is_vmlab_domain(dom):
                Vm(None, dom.name(), dom, Path("/dev/null"), bool(dom.isPersistent()), 0.0).destroy()
                gone.append(dom.name())
        return gone
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"destroy_stale_guests: {e}") from e
    finally:
        conn.close()


class Vm:
    """One running (or finished) vmlab guest."""

    def __init__(
        self, lab: Lab | None, name: str, domain: Any, console_log: Path, persistent: bool, started_at: float
    ) -> None:
        self.lab = lab
        self.name = name
        self._domain = domain
        self.console_log = console_log
        self.persistent = persistent
        self.started_at = started_at
        self.boot_seconds: float | None = None  # create() to the ready marker, host clock
        self.guest_uptime_at_ready: float | None = None  # guest's /proc/uptime at HB-READY
        self.log = log.getChild(name)
        self._console = ""
        self._console_bytes = 0
        self._destroyed = False

    @property
    def domain(self) -> Any:
        """The libvirt handle; looked up again on the lab's connection if the one it came from died
        (see ``Lab.conn``)."""
        if self.lab is not None and not _alive(self._domain.connect()):
            self._domain = self.lab.conn.lookupByUUIDString(self._domain.UUIDString())
        return self._domain

    def __repr__(self) -> str:
        return f"<Vm {self.name}>"

    # --- console -----------------------------------------------------------------------------

    def start_again(self) -> None:
        """Boot a persistent guest that has stopped (its definition as it is now), with a fresh
        console: the same command runs again."""
        self.console_log.unlink(missing_ok=True)
        self._console, self._console_bytes = "", 0
        self.started_at = time.monotonic()
        self.domain.create()

    def console(self) -> str:
        """Everything the guest wrote to its serial console so far."""
        try:
            with open(self.console_log, "rb") as f:
                f.seek(self._console_bytes)
                chunk = f.read()
        except FileNotFoundError:
            return self._console
        if chunk:
            self._console_bytes += len(chunk)
            self._console += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        return self._console

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 120.0, poll: float = 0.05
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, MULTILINE) matches the console; return the match.

        Raises GuestStopped if the guest stops first, BootTimeout after ``timeout`` seconds.
        """
        rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if not self.is_active():
                m = rx.search(self.console())  # the last bytes may have landed meanwhile
                if m:
                    return m
                raise GuestStopped(f"{self.name} stopped before {rx.pattern!r} appeared", self.console_tail())
            if guest.INIT_FAILED_MARKER in self._console:
                raise GuestStopped(f"{self.name}: guest /init failed", self.console_tail())
            if time.monotonic() > deadline:
                raise BootTimeout(
                    f"{self.name}: no {rx.pattern!r} on the console after {timeout:.0f} s",
                    self.console_tail(),
                )
            time.sleep(poll)

    def wait_for_exit(self, timeout: float = 300.0) -> int:
        """Wait for the guest command to end and the guest to power off; return its exit status."""
        deadline = time.monotonic() + timeout
        try:
            m = self.wait_for_console(guest.EXIT_RE, timeout)
        except GuestStopped as e:
            raise GuestStopped(
                f"{self.name} stopped without reporting an exit status", e.console_tail
            ) from None
        status = int(m.group(1))
        while self.is_active():
            if time.monotonic() > deadline + 30:
                raise BootTimeout(f"{self.name} printed HB-EXIT but did not power off", self.console_tail())
            time.sleep(0.1)
        self.log.debug("exited with %d", status)
        return status

    # --- libvirt state -----------------------------------------------------------------------

    def is_active(self) -> bool:
        libvirt = _libvirt()
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False  # a transient domain vanishes when it stops
            raise LibvirtFailure(f"isActive({self.name}): {e}") from e

    def xml(self) -> ET.Element:
        """The live domain XML (while running), parsed."""
        libvirt = _libvirt()
        try:
            return ET.fromstring(self.domain.XMLDesc(0))
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"XMLDesc({self.name}): {e}") from e

    def _channel_elem(self, name: str) -> ET.Element:
        if not self.is_active():
            raise ChannelError(f"{self.name} is not running", self.console_tail())
        for ch in self.xml().iterfind("./devices/channel"):
            target = ch.find("target")
            if target is not None and target.get("name") == name:
                return ch
        raise ChannelError(f"{self.name} has no channel {name!r}")

    def channel_path(self, name: str = AGENT_CHANNEL) -> str:
        """The host-side unix socket of channel ``name``, as the live domain XML states it."""
        source = self._channel_elem(name).find("source")
        path = source.get("path") if source is not None else None
        if not path:
            raise ChannelError(f"{self.name}: channel {name!r} has no source path in the live XML")
        return path

    def channel_state(self, name: str = AGENT_CHANNEL) -> str | None:
        """'connected' while a guest process has the port open, 'disconnected' otherwise
        (None when libvirt did not report it yet)."""
        target = self._channel_elem(name).find("target")
        return target.get("state") if target is not None else None

    def connect_channel(self, name: str = AGENT_CHANNEL, timeout: float = 10.0) -> socket.socket:
        """A connected AF_UNIX stream socket to channel ``name`` (blocking, no timeout set)."""
        path = self.channel_path(name)
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"{self.name}: cannot connect to {path}: {e}") from e
                time.sleep(0.1)
            except OSError:
                s.close()
                raise

    # --- teardown ----------------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop the guest at once and undefine it if persistent. Idempotent."""
        if self._destroyed:
            return
        libvirt = _libvirt()
        try:
            if self.domain.isActive():
                self.domain.destroy()
                self.log.debug("destroyed")
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise LibvirtFailure(f"destroy({self.name}): {e}") from e
        if self.persistent:
            try:
                # a backed-up guest carries checkpoints (and maybe snapshots): their metadata goes too
                self.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise LibvirtFailure(f"undefine({self.name}): {e}") from e
        self._destroyed = True


class Lab:
    """Runs vmlab guests on one libvirt connection and destroys them all on exit.

    ``workdir`` receives console logs and per-VM files.  ``max_running`` guards the shared,
    small test machines: starting more guests than that at once raises VmLabError.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        uri: str = DEFAULT_URI,
        cache_dir: Path | str = guest.DEFAULT_CACHE_DIR,
        max_running: int = 1,
        name_prefix: str = "hbvl-",
    ) -> None:
        self.workdir = Path(workdir)
        self.uri = uri
        self.cache_dir = Path(cache_dir)
        self.max_running = max_running
        self.name_prefix = name_prefix
        self._conn: Any = None
        self.vms: list[Vm] = []
        self._kernel: guest.GuestKernel | None = None
        self._initramfs: Path | None = None
        self._boot_image: Path | None = None

    @property
    def conn(self) -> Any:
        """The lab's libvirt connection, opened again if the daemon dropped it (it closes a
        connection whose keepalives go unanswered for 30 s)."""
        if self._conn is not None and not _alive(self._conn):
            log.info("libvirt connection to %s was closed; opening it again", self.uri)
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = _libvirt().open(self.uri)
        return self._conn

    @conn.setter
    def conn(self, value: Any) -> None:
        self._conn = value

    def __enter__(self) -> Lab:
        libvirt = _libvirt()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise; we raise
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HostNotReady(
                f"cannot reach libvirt at {self.uri} (run host_agent/lab/setup_host.sh): {e}"
            ) from e
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Destroy every guest this lab started, then close the connection."""
        errors: list[BaseException] = []
        for vm in reversed(self.vms):
            try:
                vm.destroy()
            except VmLabError as e:
                log.error("cleanup of %s failed: %s", vm.name, e)
                errors.append(e)
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None
        if errors:
            raise errors[0]

    @property
    def kernel(self) -> guest.GuestKernel:
        if self._kernel is None:
            self._kernel = guest.find_guest_kernel()
        return self._kernel

    @property
    def boot_image(self) -> Path:
        """The guest kernel to boot (the cached uncompressed vmlinux when possible)."""
        if self._boot_image is None:
            self._boot_image = guest.boot_image(self.cache_dir, self.kernel)
        return self._boot_image

    @property
    def initramfs(self) -> Path:
        if self._initramfs is None:
            self._initramfs = guest.build_initramfs(self.cache_dir, self.kernel)
        return self._initramfs

    def _reclaim_stale(self, name: str) -> None:
        """Remove a leftover vmlab domain of the same name (from a crashed run)."""
        libvirt = _libvirt()
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise LibvirtFailure(f"lookupByName({name}): {e}") from e
        if not _is_vmlab_domain(dom):
            raise VmLabError(f"a domain named {name!r} exists and is not a vmlab guest")
        log.warning("removing stale vmlab domain %s", name)
        Vm(self, name, dom, Path("/dev/null"), bool(dom.isPersistent()), 0.0).destroy()

    def start_vm(
        self,
        name: str,
        *,
        command: str,
        disks: Iterable[Disk] = (),
        channels: Iterable[Channel] = (Channel(),),
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        vcpus: int = 1,
        memory_mib: int = 512,
        kernel_args: Sequence[str] = (),
        persistent: bool = False,
        wait_for: str | None = guest.READY_MARKER,
        timeout: float = 180.0,
    ) -> Vm:
        """Define and start a guest running ``command`` (a /bin/sh script, chrooted in the host's
        root), and wait until ``wait_for`` (a regex) appears on its console.

        Transient by default (gone when it stops); ``persistent=True`` defines it first.  The
        guest powers off when the command ends; ``Vm.wait_for_exit`` returns its status.
        """
        if self.conn is None:
            raise VmLabError("Lab is not open: use it as a context manager")
        libvirt = _libvirt()
        disks, channels = list(disks), list(channels)
        full_name = self.name_prefix + name
        self._reclaim_stale(full_name)
        running = running_guests(self.conn)
        if len(running) >= self.max_running:
            raise VmLabError(
                f"{len(running)} vmlab guest(s) already running on {self.uri} "
                f"(max_running={self.max_running}): {', '.join(running)}"
            )

        script = compose_command(command, cwd, env)
        initrd = self.initramfs
        args = list(BASE_KERNEL_ARGS) + list(kernel_args)
        cmd_arg = guest.command_cmdline_arg(script)
        if len(cmd_arg) <= guest.MAX_CMDLINE_COMMAND:
            args.append(cmd_arg)
        else:  # too long for the kernel command line: ship it inside the initramfs
            initrd = guest.initramfs_with_command(initrd, script, self.workdir / f"{full_name}.initrd")
        console_log = self.workdir / f"{full_name}.console.log"
        console_log.unlink(missing_ok=True)
        xml = render_domain_xml(
            full_name,
            kernel=self.boot_image,
            initrd=initrd,
            cmdline=" ".join(args),
            console_log=console_log,
            disks=disks,
            channels=channels,
            vcpus=vcpus,
            memory_mib=memory_mib,
        )
        (self.workdir / f"{full_name}.xml").write_text(xml)

        t0 = time.monotonic()
        try:
            if persistent:
                dom = self.conn.defineXML(xml)
                vm = Vm(self, full_name, dom, console_log, True, t0)
                self.vms.append(vm)
                dom.create()
            else:
                dom = self.conn.createXML(xml, 0)
                vm = Vm(self, full_name, dom, console_log, False, t0)
                self.vms.append(vm)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"starting {full_name}: {e}") from e
        vm.log.info("started (%d vCPU, %d MiB, %d disk(s))", vcpus, memory_mib, len(disks))

        if wait_for is not None:
            m = vm.wait_for_console(wait_for, timeout)
            vm.boot_seconds = time.monotonic() - t0
            up = re.search(r"^HB-READY uptime=([\d.]+)", vm.console(), re.MULTILINE)
            vm.guest_uptime_at_ready = float(up.group(1)) if up else None
            vm.log.info(
                "ready after %.2f s (guest uptime %s s): %s",
                vm.boot_seconds,
                vm.guest_uptime_at_ready,
                m.group(0)[:80],
            )
        return vm
