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

A guest that can migrate between the two hosts is ``host_agent.lab.migratable``'s.

Needs root, iproute2 (``ip netns exec``), util-linux (``unshare``) and pyroute2.

A known emulator fault (``TCG_MIGRATION_BUG``): QEMU before 9.0 can lose guest writes when it
live-migrates a TCG guest, so the guest may find corrupted memory, and die, on the host it arrives on.
A test whose guest must survive a move checks ``guest.kernel_failure`` and names this as the cause.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from .domain import _libvirt
from .errors import HostNotReady, VmLabError

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


# Seen in the lab (Debian 12's QEMU 7.2.22, whose changelog lacks the fix): the appliance guest's kernel
# hit a general protection fault at its first timer interrupt after a live migration, in an hrtimer on a
# kernel stack written just before the move.
TCG_MIGRATION_BUG = (
    "QEMU before 9.0 loses guest writes when it live-migrates a TCG guest: the fast path of "
    "cpu_physical_memory_sync_dirty_bitmap() clears dirty bits without resetting TCG's TLB, so stores "
    "through TLB entries already marked dirty are never sent (upstream commit 03bfc2188f, 'physmem: Fix "
    "migration dirty bitmap coherency with TCG memory access'); the guest arrives with stale memory"
)
HOST_A_QEMU_LOGS = Path("/var/log/libvirt/qemu")
# "2026-12-07 03:14:38.751+0000: starting up libvirt version: 9.0.0, ..." heads each start's record in
# a domain's libvirt log; the QEMU command line follows, with "-incoming" for a migration's target
_START_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d{4}): starting up ", re.MULTILINE)


@dataclass(frozen=True)
class QemuStart:
    """One QEMU process a libvirtd started for a domain: a boot, or the target of a migration."""

    at: datetime
    incoming: bool  # started to receive a migration, not to boot

    @property
    def boot(self) -> bool:
        return not self.incoming


def qemu_starts(log_file: Path, since: datetime | None = None) -> list[QemuStart]:
    """The starts recorded in a domain's libvirt log (and in the one virtlogd rotated before it)."""
    text = ""
    for path in (log_file.with_name(log_file.name + ".0"), log_file):
        with contextlib.suppress(FileNotFoundError):
            text += path.read_text(errors="replace")
    heads = list(_START_LINE.finditer(text))
    starts = []
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        record = text[head.end():nxt.start() if nxt is not None else len(text)]
        at = datetime.strptime(head.group(1), "%Y-%m-%d %H:%M:%S.%f%z")
        if since is None or at >= since:
            starts.append(QemuStart(at, re.search(r"^-incoming ", record, re.MULTILINE) is not None))
    return starts


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


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise TwoHostsError(f"ip {' '.join(args)}: {r.stderr.strip()}")


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

    # --- what each daemon did ----------------------------------------------------------------

    def domain_log(self, host: str, name: str) -> Path:
        """The log host ``host``'s libvirtd ("a" or "b") keeps of domain ``name``'s QEMU processes."""
        if host not in ("a", "b"):
            raise ValueError(f"lab hosts are 'a' and 'b', not {host!r}")
        return (HOST_A_QEMU_LOGS if host == "a" else self.folder / "log" / "qemu") / f"{name}.log"

    def qemu_starts(self, host: str, name: str, since: datetime | None = None) -> list[QemuStart]:
        """The QEMU processes host ``host``'s libvirtd started for domain ``name`` (at ``since`` or
        later), oldest first.  libvirtd logs each start before the call that starts the domain
        returns, so a finished move needs no waiting for its record."""
        return qemu_starts(self.domain_log(host, name), since)

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
        _ip("netns", "add", self.netns)
        with pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname=LAN_A_IF, kind="veth", peer={"ifname": LAN_B_IF, "net_ns_fd": self.netns})
            idx = ipr.link_lookup(ifname=LAN_A_IF)[0]
            ipr.addr("add", index=idx, address=LAN_A_IP, prefixlen=LAN_PREFIX)
            ipr.link("set", index=idx, state="up")
        # iproute2, not pyroute2's netns calls: those fork this (threaded) process to enter the
        # namespace, and a fork that outlives its moment runs on as a copy of the caller inside B.
        _ip("-n", self.netns, "addr", "add", f"{LAN_B_IP}/{LAN_PREFIX}", "dev", LAN_B_IF)
        _ip("-n", self.netns, "link", "set", LAN_B_IF, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")

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

    def restart_libvirtd_b(self) -> None:
        """Kill host B's libvirtd and start it again in B's namespaces (entered through virtlogd, which
        keeps them alive); its running guests go on, and the new daemon reconnects to them."""
        self.stop_libvirtd_b()
        anchor = self.virtlogd_pid_b
        if anchor is None:
            raise TwoHostsError("host B's virtlogd is not running: cannot enter B's namespaces")
        r = subprocess.run(["nsenter", "-t", str(anchor), "-m", "-n", "libvirtd", "-d", "-p",
                            str(self.folder / "libvirtd.pid")],
                           capture_output=True, text=True, timeout=self.start_timeout)
        if r.returncode != 0:
            raise TwoHostsError(f"restarting host B's libvirtd failed ({r.returncode}): {r.stderr.strip()}")
        self.wait_until_b_answers(self.start_timeout)
        log.info("host B's libvirtd restarted: pid %s", self.libvirtd_pid_b)

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
