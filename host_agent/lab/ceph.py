"""A throwaway single-node Ceph cluster with a RADOS Gateway: the real S3 server of the tests.

Debian 12's Ceph 16.2 (Pacific) daemons, started directly (no systemd, no cephadm), everything under
one folder (``/var/tmp/hyperback-ceph`` by default)::

    with CephLab() as lab:                 # or: python -m host_agent.lab.ceph up|down
        lab.s3.endpoint, lab.s3.access_key, lab.s3.secret_key
    # daemons stopped and the folder removed, also on errors

One monitor and one manager, ONE OSD whose BlueStore lives in a sparse file (not memstore: the OSD
writes through BlueFS/RocksDB as a production one does), and radosgw with its Beast frontend on
127.0.0.1. Authentication between the daemons is off (cephx buys nothing on a loopback-only cluster
and costs a keyring per daemon; auth off has a start-up race, which ``start`` works around); S3
requests are still signed and checked against the user's keys.
Pools have one replica, which Pacific allows only with ``mon allow pool size one``.

``start()`` first stops and removes whatever an earlier run left in the folder (daemons found through
their pid files, checked against their command line so a recycled pid is never killed), so it can be
called again after a crash. Needs root and ``ceph-mon ceph-mgr ceph-osd radosgw ceph-common``
(installed by .ci/setup).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import HostNotReady, VmLabError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/tmp/hyperback-ceph")
PACKAGES = "ceph-mon ceph-mgr ceph-osd radosgw ceph-common"
TOOLS = ("monmaptool", "ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
ACCESS_KEY = "HYPERBACKLABACCESS01"
SECRET_KEY = "hyperback-lab-secret-key-not-for-production"
# The OSD's BlueStore file is sparse: its size only bounds what the tests may store.
OSD_FILE_SIZE = 8 * 1024**3
READY_TIMEOUT = 120.0
START_ATTEMPTS = 3
CLI_ATTEMPTS = 5
# radosgw 16 takes more than 15 s to leave on SIGTERM; nothing of the cluster is kept, so a daemon
# still there after this long is killed
STOP_TIMEOUT = 3.0
DAEMONS = ("client.rgw.lab", "osd.0", "mgr.x", "mon.a")
# whose log explains a tool's failure (radosgw and radosgw-admin: the gateway's)
_LOG_OF = {"ceph-mon": "mon.a", "ceph": "mon.a", "ceph-mgr": "mgr.x", "ceph-osd": "osd.0"}

_CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon max pg per osd = 1000
mon data avail warn = 1
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
[mon]
mon data = {root}/$name
[mgr]
mgr data = {root}/$name
[osd]
osd data = {root}/$name
osd objectstore = bluestore
# not inside osd data: BlueStore links "block" there to this path
bluestore block path = {root}/$name.bluestore
bluestore block create = true
bluestore block size = {osd_file_size}
# the floor Pacific accepts; the default (4 GiB) is sized for a real disk
osd memory target = 939524096
# Left on, the OSD sends its crush commands at start, and with auth off it may do so before it holds
# the monmap: the monitor refuses a command of fsid 0 ("wrong fsid") and the OSD exits (1 start in 3
# here). The lab places the OSD in the crush map itself, before starting it.
osd crush update on start = false
osd class update on start = false
[client.rgw.lab]
rgw data = {root}/rgw
# without tcp_nodelay a small ranged GET waits for a delayed ACK: 50 ms instead of 6.5 (bench/s3_packs.py)
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
"""


class CephLabError(VmLabError):
    """The lab's Ceph cluster could not be started or stopped; the message ends with the daemon's log."""


@dataclass(frozen=True)
class S3Endpoint:
    """Where the lab's RADOS Gateway answers S3, and the keys of its one user."""

    endpoint: str
    access_key: str
    secret_key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


class CephLab:
    """Start and remove the single-node cluster under ``root``; see the module docstring."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self.conf = root / "ceph.conf"
        self._s3: S3Endpoint | None = None

    @property
    def s3(self) -> S3Endpoint:
        if self._s3 is None:
            raise CephLabError("the Ceph lab is not started: call start() first")
        return self._s3

    def __enter__(self) -> CephLab:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> S3Endpoint:
        """Build a fresh cluster (removing any earlier one under ``root``) and return its S3 endpoint.

        With auth off, a Ceph 16 client (the ceph CLI, a daemon) may send its first command before it
        holds the monmap; the monitor refuses a command of fsid 0 ("wrong fsid", "problem getting
        command descriptions") and the client fails: in 2 starts of 10 here, always the ceph CLI. Its
        commands are made again (``_ceph``); any other failed start is made again from nothing, up to
        START_ATTEMPTS times, and each failure is logged."""
        self._check_host()
        for attempt in range(1, START_ATTEMPTS):
            try:
                self._s3 = self._start_once()
                return self._s3
            except CephLabError as e:
                log.warning("Ceph lab start %d of %d failed, starting again: %s", attempt, START_ATTEMPTS, e)
        self._s3 = self._start_once()
        return self._s3

    def _start_once(self) -> S3Endpoint:
        self.stop()
        fsid, mon_port, rgw_port = str(uuid.uuid4()), _free_port(), _free_port()
        self._write_conf(fsid, mon_port, rgw_port)
        try:
            self._start_monitor(fsid, mon_port)
            self._run("ceph-mgr", "-i", "x")
            self._start_osd()
            self._run("radosgw", "-n", "client.rgw.lab")
            endpoint = f"http://127.0.0.1:{rgw_port}"
            self._wait_for_gateway(endpoint)
            self._create_user()
        except BaseException:
            self.stop()
            raise
        return S3Endpoint(endpoint, ACCESS_KEY, SECRET_KEY)

    def stop(self) -> None:
        """Stop every daemon of the cluster under ``root`` and remove the folder; harmless if none."""
        self._stop_daemons()
        shutil.rmtree(self.root, ignore_errors=True)
        self._s3 = None

    def daemon_pids(self) -> dict[str, int]:
        """The running daemons' pids by Ceph name (for measuring their memory)."""
        pids = {}
        for name in DAEMONS:
            pid = self._live_pid(name)
            if pid is not None:
                pids[name] = pid
        return pids

    def _check_host(self) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise HostNotReady(f"Ceph is not installed ({', '.join(missing)} missing): "
                               f"run .ci/setup or apt-get install --no-install-recommends {PACKAGES}")
        if os.geteuid() != 0:
            raise HostNotReady("the Ceph lab needs root (its daemons bind ports and write under /var/tmp)")

    def _write_conf(self, fsid: str, mon_port: int, rgw_port: int) -> None:
        for sub in ("run", "log", "mon.a", "mgr.x", "osd.0", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_CONF.format(fsid=fsid, root=self.root, mon_port=mon_port,
                                          rgw_port=rgw_port, osd_file_size=OSD_FILE_SIZE))

    def _start_monitor(self, fsid: str, mon_port: int) -> None:
        monmap = self.root / "monmap"
        self._command(["monmaptool", "--create", "--add", "a", f"v1:127.0.0.1:{mon_port}", "--fsid", fsid,
                       str(monmap)], "mon.a")
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._run("ceph-mon", "-i", "a")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        # the monitor answers this once it has formed its quorum of one; the CLI waits for that
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephLabError(f"the monitor gave the lab's only OSD the id {osd_id!r}, not 0")
        self._ceph("osd", "crush", "add", "osd.0", "1.0", "root=default")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._run("ceph-osd", "-i", "0")

    def _wait_for_gateway(self, endpoint: str) -> None:
        """radosgw opens its port only after the OSD is up and its pools exist: that is the ready signal."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for name in DAEMONS:
                if self._live_pid(name) is None:
                    raise CephLabError(f"Ceph's {name} stopped during start-up:\n"
                                       f"{_log_tail(self.root / 'log' / f'{name}.log')}")
            try:
                with urllib.request.urlopen(endpoint, timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer, even an error, means the gateway serves requests
            except OSError:
                time.sleep(0.2)  # polling a port: no event to wait on
        raise CephLabError(f"radosgw did not answer at {endpoint} within {READY_TIMEOUT:.0f} s:\n"
                           f"{_log_tail(self.root / 'log' / 'client.rgw.lab.log')}")

    def _create_user(self) -> None:
        self._run("radosgw-admin", "user", "create", "--uid", "hyperback", "--display-name",
                  "hyperback tests", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)

    def _ceph(self, *args: str) -> str:
        """A ceph CLI command, made again when it lost the monmap race of ``start`` (both used here are
        idempotent: ``osd new`` of one uuid gives one id)."""
        for _ in range(CLI_ATTEMPTS - 1):
            try:
                return self._run("ceph", "--connect-timeout", str(int(READY_TIMEOUT)), *args)
            except CephLabError as e:
                if "problem getting command descriptions" not in str(e):
                    raise
                log.info("ceph %s lost the monmap race; running it again", " ".join(args))
        return self._run("ceph", "--connect-timeout", str(int(READY_TIMEOUT)), *args)

    def _run(self, tool: str, *args: str) -> str:
        daemon = _LOG_OF.get(tool, "client.rgw.lab")
        return self._command([tool, "-c", str(self.conf), *args], daemon)

    def _command(self, argv: list[str], daemon: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=READY_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as e:
            raise CephLabError(f"{' '.join(argv)} did not finish within {READY_TIMEOUT:.0f} s") from e
        if done.returncode != 0:
            raise CephLabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}\n"
                               f"{_log_tail(self.root / 'log' / f'{daemon}.log')}")
        return done.stdout

    def _live_pid(self, name: str) -> int | None:
        """The pid in ``name``'s pid file if that process is alive and one of this cluster's daemons."""
        try:
            pid = int((self.root / "run" / f"{name}.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if str(self.conf).encode() in cmdline else None

    def _stop_daemons(self) -> None:
        """SIGTERM all at once, then SIGKILL those still there after STOP_TIMEOUT."""
        pids = self.daemon_pids()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(Path(f"/proc/{pid}").exists() for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)  # foreign processes' exits: no event to wait on
        for name, pid in pids.items():
            if Path(f"/proc/{pid}").exists():
                log.debug("Ceph's %s (pid %d) still there after SIGTERM; killing it", name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """``up`` prints the endpoint and keys as shell assignments; ``down`` stops and removes the cluster."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0] not in ("up", "down"):
        print("usage: python -m host_agent.lab.ceph up|down [ROOT]", file=sys.stderr)
        return 2
    lab = CephLab(Path(args[1]) if len(args) == 2 else DEFAULT_ROOT)
    try:
        if args[0] == "down":
            lab.stop()
            return 0
        s3 = lab.start()
    except VmLabError as e:
        print(f"ceph lab: {e}", file=sys.stderr)
        return 1
    print(f"HYPERBACK_S3_ENDPOINT={s3.endpoint}\nHYPERBACK_S3_ACCESS_KEY={s3.access_key}\n"
          f"HYPERBACK_S3_SECRET_KEY={s3.secret_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
