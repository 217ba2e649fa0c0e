"""Two libvirt "hosts" on one machine, joined by a veth "LAN", for live-migration tests.

Host A is the machine's own libvirtd (``qemu:///system``, root network namespace).  Host B is a
second libvirtd started by ``TwoHosts`` in a network namespace of its own and a mount namespace of
its own, where /var/run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and
/etc/libvirt are private folders under ``workdir``::

    with TwoHosts(workdir) as hosts:
        hosts.uri_a, hosts.uri_b          # libvirt URIs valid in the root namespace *and* in B's
        hosts.lan_tx_bytes()              # bytes sent over lan0 (A -> B)
    # B's guests destroyed, B's daemons killed, namespace and veth pair deleted, also on errors

The LAN: ``lan0`` 10.77.0.1/24 in the root namespace (host A), ``lan1`` 10.77.0.2/24 in B's
namespace.  Migration streams (``tcp://10.77.0.x:49152``) travel over it.

``uri_a`` is not ``qemu:///system``: B's daemon must reach A's socket for a peer-to-peer migration
B -> A, but B's /run/libvirt is private.  ``<folder>/hosta-run/libvirt-sock`` is a symlink to A's
socket in the root namespace, and in B's mount namespace ``<folder>/hosta-run`` is a bind mount of
A's /run/libvirt, so the one URI works from both sides.

``migratable_guest_xml`` / ``start_migratable_vm`` boot a guest that can migrate: the lab's kernel
and initramfs with a replacement /init that runs the command from the initramfs's busybox (no 9p
mount, which blocks migration), a disk on storage both daemons see, the agent channel, and a
console log opened in append mode (the destination QEMU reopens it).

Needs root, iproute2 (``ip netns exec``), util-linux (``unshare``) and pyroute2.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import guest
from .domain import BASE_KERNEL_ARGS, Channel, Disk, Lab, Vm, _libvirt, render_domain_xml, running_guests
from .errors import HostNotReady, LibvirtFailure, VmLabError

log = logging.getLogger(__name__)

NETNS = "hbvl-hostb"
LAN_A_IF = "lan0"
LAN_B_IF = "lan1"
LAN_A_IP = "10.77.0.1"
LAN_B_IP = "10.77.0.2"
LAN_PREFIX = 24
HOST_A_RUN = Path("/var/run/libvirt")
# host B's private copies of these (bind mounts in its mount namespace), folder name -> mount point
PRIVATE_DIRS = {
    "run": "/var/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
    "etc": "/etc/libvirt",
}


class TwoHostsError(VmLabError):
    """Host B could not be set up or torn down."""


def _iproute() -> Any:
    try:
        import pyroute2  # type: ignore[import-untyped]
    except ImportError as e:
        raise HostNotReady("pyroute2 is not installed in this Python (pip install pyroute2)") from e
    return pyroute2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, then SIGKILL it after ``timeout`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("pid %d ignored SIGTERM, killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _delete_lan0() -> None:
    """Delete lan0 (and so its peer) if it exists.  Deleting B's namespace deletes the pair too,
    asynchronously: the link may vanish between the lookup and the delete (ENODEV)."""
    pyroute2 = _iproute()
    with pyroute2.IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=LAN_A_IF):
            try:
                ipr.link("del", index=idx)
            except pyroute2.NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise


def _wait_lan0_gone(timeout: float = 5.0) -> None:
    pyroute2 = _iproute()
    deadline = time.monotonic() + timeout
    with pyroute2.IPRoute() as ipr:
        while ipr.link_lookup(ifname=LAN_A_IF):
            if time.monotonic() > deadline:
                raise TwoHostsError(f"{LAN_A_IF} still exists {timeout:.0f} s after its deletion")
            time.sleep(0.05)


def netns_pids(name: str) -> list[int]:
    """The processes in network namespace ``name`` (iproute2: pyroute2 has no such call)."""
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []


_START_SCRIPT = """\
#!/bin/sh
# host B of hyperback's vmlab: runs in its own network and mount namespaces.
set -eu
F={folder}
mount --make-rprivate /
mount --bind {host_a_run} "$F/hosta-run"
mount --bind "$F/run" /var/run/libvirt
mount --bind "$F/lib" /var/lib/libvirt
mount --bind "$F/log" /var/log/libvirt
mount --bind "$F/cache" /var/cache/libvirt
mount --bind "$F/etc" /etc/libvirt
virtlogd -d -p "$F/virtlogd.pid"
libvirtd -d -p "$F/libvirtd.pid"
"""


class TwoHosts:
    """Host B (a second libvirtd in its own namespaces) plus the veth LAN to host A.

    ``workdir`` gets ``hostb/`` (B's private libvirt folders, its pid files, its start script).
    One ``TwoHosts`` per machine at a time (fixed namespace and interface names); a leftover of a
    killed run is removed on entry.
    """

    def __init__(self, workdir: Path | str, *, start_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.folder = self.workdir / "hostb"
        self.start_timeout = start_timeout
        self.host_uuid_b = str(uuid.uuid4())
        self.netns = NETNS
        self.lan_ip_a = LAN_A_IP
        self.lan_ip_b = LAN_B_IP
        self._entered = False

    # --- URIs --------------------------------------------------------------------------------

    @property
    def uri_a(self) -> str:
        return f"qemu+unix:///system?socket={self.folder / 'hosta-run' / 'libvirt-sock'}"

    @property
    def uri_b(self) -> str:
        return f"qemu+unix:///system?socket={self.folder / 'run' / 'libvirt-sock'}"

    @property
    def libvirtd_pid_b(self) -> int | None:
        return _read_pid(self.folder / "libvirtd.pid")

    @property
    def virtlogd_pid_b(self) -> int | None:
        return _read_pid(self.folder / "virtlogd.pid")

    # --- LAN ---------------------------------------------------------------------------------

    def _lan_stats(self) -> dict[str, int]:
        pyroute2 = _iproute()
        with pyroute2.IPRoute() as ipr:
            links = ipr.get_links(ifname=LAN_A_IF)
            if not links:
                raise TwoHostsError(f"{LAN_A_IF} does not exist")
            stats = links[0].get_attr("IFLA_STATS64")
        return {k: int(v) for k, v in stats.items()} if stats else {}

    def lan_tx_bytes(self) -> int:
        """Bytes host A sent over the LAN (lan0's tx counter)."""
        return self._lan_stats()["tx_bytes"]

    def lan_rx_bytes(self) -> int:
        """Bytes host A received over the LAN (lan0's rx counter)."""
        return self._lan_stats()["rx_bytes"]

    # --- setup -------------------------------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        if os.geteuid() != 0:
            raise HostNotReady("TwoHosts needs root (network and mount namespaces)")
        for tool in ("ip", "unshare", "libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                raise HostNotReady(f"{tool} not found")
        self._entered = True
        try:
            self._remove_stale()
            self._prepare_folder()
            self._make_lan()
            self._start_daemons()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _remove_stale(self) -> None:
        pyroute2 = _iproute()
        if self.netns in pyroute2.netns.listnetns():
            log.warning("removing stale network namespace %s", self.netns)
            self._kill_netns_processes()
            pyroute2.netns.remove(self.netns)
        _delete_lan0()

    def _prepare_folder(self) -> None:
        f = self.folder
        if f.exists():
            shutil.rmtree(f)
        for sub in PRIVATE_DIRS:
            (f / sub).mkdir(parents=True)
        (f / "lib" / "qemu").mkdir()
        (f / "log" / "qemu").mkdir()
        (f / "cache" / "qemu").mkdir()
        shutil.rmtree(f / "etc")
        shutil.copytree("/etc/libvirt", f / "etc", symlinks=True)  # qemu.conf as host A's
        conf = f / "etc" / "libvirtd.conf"
        text = conf.read_text() if conf.exists() else ""
        text += (
            f'\n# hyperback vmlab host B\nhost_uuid = "{self.host_uuid_b}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        conf.write_text(text)
        # In the root namespace the symlink leads to A's socket; in B's mount namespace the
        # folder is covered by a bind mount of A's /run/libvirt (see the module docstring).
        (f / "hosta-run").mkdir()
        (f / "hosta-run" / "libvirt-sock").symlink_to(HOST_A_RUN / "libvirt-sock")
        script = _START_SCRIPT.format(folder=f, host_a_run=HOST_A_RUN)
        (f / "start.sh").write_text(script)

    def _make_lan(self) -> None:
        pyroute2 = _iproute()
        pyroute2.netns.create(self.netns)
        with pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname=LAN_A_IF, kind="veth", peer={"ifname": LAN_B_IF, "net_ns_fd": self.netns})
            idx = ipr.link_lookup(ifname=LAN_A_IF)[0]
            ipr.addr("add", index=idx, address=LAN_A_IP, prefixlen=LAN_PREFIX)
            ipr.link("set", index=idx, state="up")
        with pyroute2.IPRoute(netns=self.netns) as ipr:
            idx = ipr.link_lookup(ifname=LAN_B_IF)[0]
            ipr.addr("add", index=idx, address=LAN_B_IP, prefixlen=LAN_PREFIX)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _start_daemons(self) -> None:
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", str(self.folder / "start.sh")],
            capture_output=True,
            text=True,
            timeout=self.start_timeout,
        )
        if r.returncode != 0:
            raise TwoHostsError(f"starting host B failed ({r.returncode}): {r.stderr.strip()}")
        self.wait_until_b_answers(self.start_timeout)
        self._prime_b()
        log.info("host B up: libvirtd pid %s, %s", self.libvirtd_pid_b, self.uri_b)

    def wait_until_b_answers(self, timeout: float = 30.0) -> None:
        libvirt = _libvirt()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = libvirt.open(self.uri_b)
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise TwoHostsError(f"host B's libvirtd does not answer at {self.uri_b}: {e}") from e
                time.sleep(0.1)
                continue
            conn.close()
            return

    def _prime_b(self) -> None:
        """Make B's libvirtd probe QEMU now (its capability cache is private and starts empty):
        otherwise the first incoming migration pays for it (~4 s)."""
        libvirt = _libvirt()
        try:
            conn = libvirt.open(self.uri_b)
            try:
                conn.getDomainCapabilities(None, "x86_64", "pc", "qemu", 0)
            finally:
                conn.close()
        except libvirt.libvirtError as e:
            raise TwoHostsError(f"host B's libvirtd cannot probe QEMU: {e}") from e

    # --- teardown ----------------------------------------------------------------------------

    def stop_libvirtd_b(self) -> None:
        """Kill host B's libvirtd only (its guests, virtlogd and the LAN stay): for failure tests."""
        pid = self.libvirtd_pid_b
        if pid is not None:
            _kill(pid)

    def _destroy_guests_b(self) -> None:
        pid = self.libvirtd_pid_b
        if pid is None or not _pid_alive(pid):
            return
        libvirt = _libvirt()
        try:
            conn = libvirt.open(self.uri_b)
        except libvirt.libvirtError as e:
            log.warning("cannot reach host B to destroy its guests: %s", e)
            return
        try:
            for dom in conn.listAllDomains(0):
                log.warning("destroying %s left on host B", dom.name())
                try:
                    persistent = dom.isPersistent()
                    if dom.isActive():
                        dom.destroy()
                    if persistent:
                        dom.undefine()
                except libvirt.libvirtError as e:
                    log.warning("destroying %s on host B: %s", dom.name(), e)
        finally:
            conn.close()

    def _kill_netns_processes(self) -> None:
        # Everything in the namespace was started by a TwoHosts (daemons, their QEMUs).
        for pid in netns_pids(self.netns):
            _kill(pid)

    def close(self) -> None:
        """Destroy B's guests, kill B's daemons and every process in B's namespace, delete the
        namespace and the veth pair.  Idempotent; keeps going past errors, raises the first."""
        if not self._entered:
            return
        errors: list[BaseException] = []

        def attempt(what: str, fn: Any) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - teardown must go on
                log.error("TwoHosts teardown: %s: %s", what, e)
                errors.append(e)

        attempt("destroy guests", self._destroy_guests_b)
        for pid in (self.libvirtd_pid_b, self.virtlogd_pid_b):
            if pid is not None:
                attempt(f"kill {pid}", lambda p=pid: _kill(p))
        if self.netns in _iproute().netns.listnetns():
            attempt("kill namespace processes", self._kill_netns_processes)
            attempt("remove netns", lambda: _iproute().netns.remove(self.netns))

        attempt("delete lan0", _delete_lan0)
        attempt("wait for lan0 to go", _wait_lan0_gone)
        self._entered = False
        if errors:
            err = errors[0]
            raise TwoHostsError(f"TwoHosts teardown failed: {err}") from err


# --- a guest that can migrate -----------------------------------------------------------------

# /init of a migratable guest: like init.sh, but no 9p and no chroot: the command runs on the
# initramfs's busybox.  Same console markers (HB-READY, HB-EXIT).
MIGRATABLE_INIT = """\
#!/bin/sh
export PATH=/bin
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/hb/modules); do
    insmod "/lib/modules/$m.ko" 2>/dev/null
done
hostname hb-guest
b64=
for w in $(cat /proc/cmdline); do
    case "$w" in hb.cmd=*) b64=${w#hb.cmd=} ;; esac
done
cmd=$(echo "$b64" | base64 -d)
read -r up _ < /proc/uptime
echo "HB-READY uptime=$up"
/bin/sh -c "$cmd" < /dev/null
echo "HB-EXIT $?"
sync
poweroff -f
sleep 10
echo o > /proc/sysrq-trigger
"""


def migratable_initramfs(base: Path, out: Path) -> Path:
    """``out`` = the lab initramfs ``base`` + a cpio segment replacing /init by MIGRATABLE_INIT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".init-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        init = root / "init"
        init.write_text(MIGRATABLE_INIT)
        init.chmod(0o755)
        seg = Path(tmp) / "seg.cpio.gz"
        guest._pack_cpio(root, seg)
        part = out.with_name(out.name + ".part")
        with open(part, "wb") as f:
            with open(base, "rb") as b:
                shutil.copyfileobj(b, f)
            f.write(b"\0" * ((-f.tell()) % 4))  # cpio segments start 4-byte aligned
            f.write(seg.read_bytes())
        part.replace(out)
    return out


def migratable_guest_xml(
    name: str,
    *,
    kernel: Path | str,
    initrd: Path | str,
    command: str,
    console_log: Path | str,
    disks: Sequence[Disk] = (),
    channels: Sequence[Channel] = (Channel(),),
    vcpus: int = 1,
    memory_mib: int = 256,
    cpu_mode: str = "maximum",
) -> str:
    """Domain XML of a guest that can live-migrate: the lab's XML without the 9p <filesystem>,
    the console log in append mode, the command on the kernel command line.

    ``initrd`` must be a ``migratable_initramfs``; every path (kernel, initrd, disks, console)
    must be one both daemons see (outside B's private folders: e.g. /var/tmp or pytest's tmp_path).
    """
    cmdline = " ".join([*BASE_KERNEL_ARGS, guest.command_cmdline_arg(command)])
    xml = render_domain_xml(
        name,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        console_log=console_log,
        disks=disks,
        channels=channels,
        vcpus=vcpus,
        memory_mib=memory_mib,
        cpu_mode=cpu_mode,
    )
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        raise VmLabError("domain XML without <devices>")
    for fs in devices.findall("filesystem"):
        devices.remove(fs)
    for tag in ("serial", "console"):
        for elem in devices.findall(tag):
            src = elem.find("source")
            if src is not None:
                src.set("append", "on")  # the destination's QEMU reopens the log
    return ET.tostring(root, encoding="unicode")


def start_migratable_vm(
    lab: Lab,
    name: str,
    *,
    command: str,
    disks: Sequence[Disk] = (),
    memory_mib: int = 256,
    timeout: float = 120.0,
) -> Vm:
    """Start a migratable guest (transient) on the lab's connection and wait for HB-READY.

    The ``Vm`` keeps the source domain handle: after a migration use ``Vm.console()`` (the log
    file is shared) and look the domain up on the other host by ``vm.name``.
    """
    if lab.conn is None:
        raise VmLabError("Lab is not open: use it as a context manager")
    libvirt = _libvirt()
    full_name = lab.name_prefix + name
    lab._reclaim_stale(full_name)
    running = running_guests(lab.conn)
    if len(running) >= lab.max_running:
        raise VmLabError(f"vmlab guest(s) already running on {lab.uri}: {', '.join(running)}")
    initrd = migratable_initramfs(lab.initramfs, lab.workdir / "migratable-initramfs.cpio.gz")
    console_log = lab.workdir / f"{full_name}.console.log"
    console_log.unlink(missing_ok=True)
    xml = migratable_guest_xml(
        full_name,
        kernel=lab.boot_image,
        initrd=initrd,
        command=command,
        console_log=console_log,
        disks=disks,
        memory_mib=memory_mib,
    )
    (lab.workdir / f"{full_name}.xml").write_text(xml)
    t0 = time.monotonic()
    try:
        dom = lab.conn.createXML(xml, 0)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"starting {full_name}: {e}") from e
    vm = Vm(lab, full_name, dom, console_log, False, t0)
    lab.vms.append(vm)
    vm.wait_for_console(guest.READY_MARKER, timeout)
    vm.boot_seconds = time.monotonic() - t0
    return vm
