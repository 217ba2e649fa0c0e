"""The backup appliance of the two-host lab: a live-migratable VM that runs the media service.

The appliance is a ``start_migratable_vm`` guest (no 9p, so it can live-migrate) that runs the real
``python -m host_agent.media.server`` on a predefined address, ``APPLIANCE_IP``:``MEDIA_PORT``, serving one
repository (destination ``DESTINATION``).  Moving the VM moves the service; the host that runs it
routes the address to it (``host_agent.colocation.serviceip.ApplianceRoute``), so the address answers from
both hosts wherever the VM runs::

    with TwoHosts(root / "hosts") as hosts, Lab(root / "lab-b", uri=hosts.uri_b) as lab_b:
        app = start_appliance(lab_b, root / "appliance")     # on host B; waits for the service
        claim_route(hosts, "b")                              # B routes 10.77.0.200 to the VM
        ... RemoteRepository(app.service, app.destination) from host A, over the LAN ...
        live_migrate(app.name, hosts.uri_b, hosts.uri_a, hosts.lan_ip_a)
        release_route(hosts, "b"); claim_route(hosts, "a")
        app.destroy(hosts.uri_a, hosts.uri_b)

What the guest consists of, and why:

* the lab kernel and a ``migratable_initramfs`` (busybox, the lab's modules) plus one small segment:
  ``virtio_net`` and the modules it needs (this guest only: the lab's GUEST_MODULES are unchanged),
  the full module list, and ``/appliance/start`` (``START_SCRIPT``), the command the guest runs;
* **the system disk** (``system_image``), a read-only ext4 image built with ``mke2fs -d`` (no loop
  mount, no root needed to build it) and cached in the lab's cache dir, keyed on its inputs.  It
  holds Debian's /usr/bin/python3 (the venv's interpreter is a pyenv build whose libpython alone is
  23 MB of debug info; Debian's is the same 3.11 ABI, so the venv's cp311 wheels load in it), the
  whole stdlib compiled to unchecked-hash pycs (no compiling under TCG, and nothing to miss that
  a lazy import wants), the site-packages the media service imports (found by importing and
  running it at build time: grpc, protobuf, cffi, ...), the project's ``host_agent`` package with
  its native copier (``host_agent/storage/_copier.abi3.so``), and every shared library ``ldd`` names for
  all of them.  It is a disk rather than more initramfs because an initramfs lives in guest RAM,
  and guest RAM is what a live migration sends: from a disk the guest reads only the pages it uses
  (about 33 MB of the 68 MB of files), and the page cache holds them.  The build imports the
  service chrooted in the tree before it packs the image, so a missing file fails at build time
  rather than in TCG;
* **the repository disk** (``repository_disk``), a raw file with an ext4 file system (mke2fs again)
  that already holds an initialised repository ``/media-app``: read-write, on storage both hosts'
  daemons see (it migrates with ``VIR_MIGRATE_UNSAFE``, as every lab disk on a local file system);
* **a routed NIC**: ``<interface type='ethernet'>`` with MAC ``APPLIANCE_MAC`` and tap ``TAP``, which
  libvirt creates on whichever host runs the guest (with the MAC fe:54:00:77:00:c8 on both hosts:
  the first byte of the guest's replaced by 0xfe).  The guest holds ``APPLIANCE_IP``/32 and routes
  everything via ``APPLIANCE_GATEWAY``, which ``ApplianceRoute`` puts on the tap of the host that
  runs it.

What a migration sends is the guest's non-zero pages, so the guest keeps few: freed pages are
zeroed (``KERNEL_ARGS``: init_on_free=1), clean page cache is dropped every ``CACHE_DROP_SECONDS``,
and glibc returns the service's big buffers to the kernel (MALLOC_* in ``START_SCRIPT``).  Measured
with 256 MiB of RAM (``DEFAULT_MEMORY_MIB``) after a 32 MiB backup: about 150 MB per migration
(kernel ~45 MB, slab ~20 MB, the service's mapped files ~35 MB and heap ~30 MB); 171-203 MB
without the cache drop and the malloc settings, 188-234 MB without init_on_free either.  192 MiB of
RAM also served a 32 MiB backup; with 128 MiB the service stalled.

The guest mounts both disks, chroots into the system disk and starts the media service; its console
shows ``HB-APPLIANCE-READY <ip>:<port>`` once the service listens (``HB-APPLIANCE-FAILED <why>`` if
it cannot start, ``HB-APPLIANCE-STOPPED <status>`` if it exits).  The service's log goes to the
console as well.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from host_agent.colocation.serviceip import APPLIANCE_GATEWAY, ApplianceRoute
from host_agent.config import NO_TLS, TlsConfig

from . import guest
from .domain import Disk, Lab, Vm, _libvirt
from .errors import GuestBuildError, GuestStopped, HostNotReady, LibvirtFailure, VmLabError
from .migratable import (
    GUEST_PYTHON,
    _copy_in,
    guest_interpreter,
    migratable_initramfs,
    shared_libraries,
    start_migratable_vm,
)
from .twohosts import LAN_A_IF, LAN_B_IF, TwoHosts

log = logging.getLogger(__name__)

APPLIANCE_IP = "10.77.0.200"
MEDIA_PORT = 7420
APPLIANCE_MAC = "52:54:00:77:00:c8"
TAP = "hbapp0"
DESTINATION = "media-app"
HOST_NAME = "appliance"  # the media service's host name, as clients see it
TLS_DIR = "tls"          # on the repository disk: the service's CA, certificate and key, if given
NAME = "appliance"  # the domain is the lab's name_prefix + NAME
SYSTEM_SERIAL = "hb-app-system"
REPO_SERIAL = "hb-app-repo"
READY_MARKER = "HB-APPLIANCE-READY"
FAILED_MARKER = "HB-APPLIANCE-FAILED"
DEFAULT_MEMORY_MIB = 256
DEFAULT_REPO_BYTES = 512 << 20
EXTRA_MODULES = ("virtio_net",)
# Freed pages are zeroed, and a live migration skips zero pages: the stream carries what the guest
# holds now (the service, its page cache), not every page it ever touched (the initramfs unpacked at
# boot, the buffers of past backups).
KERNEL_ARGS = ("init_on_free=1",)
CACHE_DROP_SECONDS = 5
GUEST_HOME = "/opt/hyperback"  # on the system disk: host_agent/ and the site-packages
CHECKOUT = Path(__file__).resolve().parents[2]
HOST_AGENT = CHECKOUT / "host_agent"

# Top-level site-packages entries never copied although the trace sees them: grpc's __init__
# imports grpc_tools if it is there (the protoc compiler, 10 MB, a build-time tool).
SITE_EXCLUDE = frozenset({"grpc_tools"})
# Parts of the stdlib a media service has no use for (tests, GUIs, the static libpython, installers).
STDLIB_EXCLUDE = frozenset({
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "site-packages",
    "dist-packages", "__pycache__", "config-3.11-x86_64-linux-gnu", "venv", "distutils", "unittest",
})

_FORMAT_VERSION = "1"  # bump to invalidate cached appliance images

NIC_XML = f"""<interface type='ethernet'>
  <mac address='{APPLIANCE_MAC}'/>
  <target dev='{TAP}'/>
  <model type='virtio'/>
</interface>"""

# /appliance/start: the guest's command (busybox sh, after MIGRATABLE_INIT loaded the modules).
START_SCRIPT = f"""\
#!/bin/sh
# hyperback vmlab backup appliance: see host_agent/lab/appliance.py
fail() {{ echo "{FAILED_MARKER} $*"; exit 1; }}
disk() {{  # the device node of the virtio disk whose serial is $1
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && {{ echo "/dev/${{d##*/}}"; return 0; }}
    done
    return 1
}}
sys=$(disk {SYSTEM_SERIAL}) || fail "no disk with serial {SYSTEM_SERIAL}"
repo=$(disk {REPO_SERIAL}) || fail "no disk with serial {REPO_SERIAL}"
mkdir -p /app
mount -t ext4 -o ro "$sys" /app || fail "cannot mount the system disk $sys"
mount -t ext4 -o noatime "$repo" /app/repo || fail "cannot mount the repository disk $repo"
mount -t proc proc /app/proc
mount -t sysfs sysfs /app/sys
mount -t devtmpfs devtmpfs /app/dev
mount -t tmpfs -o size=32m tmpfs /app/tmp
nic=
for n in /sys/class/net/*; do
    [ "$(cat "$n/address")" = "{APPLIANCE_MAC}" ] && nic=${{n##*/}}
done
[ -n "$nic" ] || fail "no NIC with MAC {APPLIANCE_MAC}"
ip link set lo up
ip addr add {APPLIANCE_IP}/32 dev "$nic"
ip link set "$nic" up
ip route add {APPLIANCE_GATEWAY} dev "$nic"
ip route add default via {APPLIANCE_GATEWAY} dev "$nic" || fail "cannot route via {APPLIANCE_GATEWAY}"
echo "HB-APPLIANCE-NET $nic {APPLIANCE_IP}/32 via {APPLIANCE_GATEWAY}"
# Clean page cache (packs written or restored, files read once) is RAM a live migration would send:
# drop it every few seconds (freed pages are zeroed, see KERNEL_ARGS; mapped pages stay).
( while sleep {CACHE_DROP_SECONDS}; do echo 1 > /proc/sys/vm/drop_caches; done ) &
export PATH=/usr/bin:/bin HOME=/ PYTHONPATH={GUEST_HOME} PYTHONDONTWRITEBYTECODE=1
# glibc: big buffers (1 MiB messages) mmapped and unmapped when freed, few arenas, free tops trimmed:
# memory the service no longer uses goes back to the kernel (zeroed) instead of migrating
export MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072
# mutual TLS with the certificates the repository disk carries; a lab without them allows plain TCP
if [ -f /app/repo/{TLS_DIR}/ca.pem ]; then
    t=/repo/{TLS_DIR}
    tls="--tls-ca $t/ca.pem --tls-cert $t/service.pem --tls-key $t/service.key"
else
    tls=--allow-plaintext
fi
chroot /app /usr/bin/python3 -m host_agent.media.server --listen {APPLIANCE_IP}:{MEDIA_PORT} \\
    --repo {DESTINATION}=/repo/{DESTINATION} --host-name {HOST_NAME} $tls &
pid=$!
# listening (state 0A); grpc binds a dual-stack socket, so the port may show in tcp6
while ! grep -qE ":{MEDIA_PORT:04X} 0+:0000 0A " /proc/net/tcp /proc/net/tcp6; do
    kill -0 $pid 2>/dev/null || {{ wait $pid; fail "the media service exited with status $?"; }}
    sleep 0.2
done
read -r up _ < /proc/uptime
echo "{READY_MARKER} {APPLIANCE_IP}:{MEDIA_PORT} uptime=$up"
wait $pid
echo "HB-APPLIANCE-STOPPED $?"
"""

# Runs on the guest's interpreter at build time (argv: the checkout, the site-packages, the output
# file): imports the media service and runs its --help, then lists every module file loaded.
_TRACE_SCRIPT = r"""
import json, runpy, sys
checkout, site, out = sys.argv[1:4]
sys.path[:0] = [checkout, site]
import host_agent.media.server, host_agent.storage.copier, grpc
host_agent.storage.copier.selftest()
sys.argv = ["hyperback-media", "--help"]
try:
    runpy.run_module("host_agent.media.server", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
files = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())} - {""})
with open(out, "w") as f:
    json.dump(files, f)
"""

# Run chrooted in the staged tree, as the guest will run the service: a file missing from the tree
# fails here, at build time.
_SMOKE_SCRIPT = """
import grpc, host_agent.storage.copier, host_agent.media.server
host_agent.storage.copier.selftest()
print("appliance-smoke-ok", grpc.__version__)
"""


# --------------------------------------------------------------------------- the system disk

def site_packages() -> Path:
    """The site-packages folder grpc is imported from here (the venv's): the guest gets its copy."""
    import grpc

    return Path(grpc.__file__).resolve().parents[1]


def _run(args: list[str], what: str, timeout: float = 300.0, **env: str) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", **env})
    except FileNotFoundError as e:
        raise HostNotReady(f"{what}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"{what}: timed out after {timeout:.0f} s") from e
    if r.returncode != 0:
        raise GuestBuildError(f"{what} failed ({r.returncode}): {(r.stdout + r.stderr).strip()[-2000:]}")
    return r.stdout


def _host_agent_files() -> list[Path]:
    """The package's files the service may load: every .py and native module, not the lab."""
    files = []
    for path in sorted(HOST_AGENT.rglob("*")):
        rel = path.relative_to(HOST_AGENT)
        if rel.parts[0] == "lab" or "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.suffix in (".py", ".so"):
            files.append(path)
    return files


def _stdlib_entries(stdlib: Path) -> list[Path]:
    return sorted(p for p in stdlib.iterdir() if p.name not in STDLIB_EXCLUDE and p.suffix != ".txt"
                  and p.name != "EXTERNALLY-MANAGED")


def _system_cache_key(interpreter: Path, site: Path) -> str:
    """Changes when the interpreter, the installed distributions, the host_agent package or this
    builder change.  The interpreter's size and mtime stand for its stdlib and libraries (Debian
    ships them with it); the distributions by their dist-info names (name and version);
    host_agent's files are hashed, as they change without their size changing."""
    h = hashlib.sha256()
    for part in (_FORMAT_VERSION, _TRACE_SCRIPT, _SMOKE_SCRIPT, GUEST_HOME, repr(sorted(SITE_EXCLUDE)),
                 repr(sorted(STDLIB_EXCLUDE))):
        h.update(part.encode() + b"\0")
    st = interpreter.stat()
    h.update(f"{interpreter}:{st.st_size}:{st.st_mtime_ns}\0{site}\0".encode())
    for dist in sorted(site.glob("*.dist-info")):
        h.update(dist.name.encode() + b"\0")
    for path in _host_agent_files():
        digest = hashlib.sha256(path.read_bytes()).digest()
        h.update(str(path.relative_to(HOST_AGENT)).encode() + b"\0" + digest)
    return h.hexdigest()[:16]


def _trace_site_entries(interpreter: Path, site: Path, work: Path) -> list[str]:
    """The top-level entries of ``site`` (packages, modules) the media service loads."""
    out = work / "trace.json"
    _run([str(interpreter), "-S", "-E", "-s", "-B", "-c", _TRACE_SCRIPT, str(CHECKOUT), str(site), str(out)],
         "tracing the media service's imports")
    entries = set()
    for name in json.loads(out.read_text()):
        path = Path(name)
        if path.is_relative_to(site):
            entries.add(path.relative_to(site).parts[0])
    return sorted(entries - SITE_EXCLUDE)


def _copy_tree(src: Path, dst: Path, *ignore: str) -> None:
    """Copy file or folder ``src`` to ``dst``, symlinks followed (Debian links sitecustomize.py to
    /etc), leaving out __pycache__ (compiled afresh) and the names in ``ignore``."""
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", *ignore))
    elif src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _stage_system(root: Path, interpreter: Path, site: Path, work: Path) -> dict[str, int]:
    """Fill ``root`` with the appliance's file tree; returns counts for the log."""
    stdlib = Path(_run([str(interpreter), "-S", "-E", "-c", "import os; print(os.path.dirname(os.__file__))"],
                       "asking the interpreter for its stdlib").strip())
    _copy_in(root, interpreter)
    (root / GUEST_PYTHON.relative_to("/")).symlink_to(interpreter)
    for entry in _stdlib_entries(stdlib):
        _copy_tree(entry, root / entry.relative_to("/"), "test", "tests")  # the packages' own tests
    home = root / GUEST_HOME.lstrip("/")
    site_entries = _trace_site_entries(interpreter, site, work)
    for name in site_entries:
        _copy_tree(site / name, home / name)
    for path in _host_agent_files():
        dst = home / "host_agent" / path.relative_to(HOST_AGENT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
    binaries = [interpreter, *(p for p in root.rglob("*.so") if p.is_file() and not p.is_symlink())]
    libraries: set[Path] = set()
    for binary in binaries:
        libraries.update(shared_libraries(binary))
    for lib in sorted(libraries):
        _copy_in(root, lib)
    for d in ("proc", "sys", "dev", "tmp", "repo", "etc", "run"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    # unchecked-hash pycs: never compared with their source; tracebacks name the guest's paths
    _run([str(interpreter), "-E", "-s", "-m", "compileall", "-q", "-j", "1", "--invalidation-mode",
          "unchecked-hash", "-s", str(root), "-p", "/", str(root / stdlib.relative_to("/")), str(home)],
         "compiling the appliance's Python files")
    return {"site_entries": len(site_entries), "binaries": len(binaries), "libraries": len(libraries)}


def _smoke_test(root: Path) -> str:
    """Import and self-test the service chrooted in ``root`` as the guest runs it.  Needs root."""
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        log.info("not root or no chroot: skipping the appliance's smoke test")
        return "skipped"
    return _run(["chroot", str(root), str(GUEST_PYTHON), "-c", _SMOKE_SCRIPT], "the appliance's smoke test",
                PYTHONPATH=GUEST_HOME, PYTHONDONTWRITEBYTECODE="1").strip()


def _tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes, entries) of the files under ``root``."""
    total = count = 0
    for path in root.rglob("*"):
        count += 1
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total, count


def make_ext4(image: Path, tree: Path, size: int | None = None, *, label: str, journal: bool = True) -> Path:
    """``image`` = a new ext4 file system holding a copy of ``tree`` (``mke2fs -d``: no mount, no
    loop device).  Without ``size``, room for the tree plus a quarter, owned by root."""
    data, entries = _tree_bytes(tree)
    if size is None:
        size = int(data * 1.25) + (16 << 20) + entries * 4096
    size = -(-size // (1 << 20)) << 20
    args = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-d", str(tree),
            "-E", "root_owner=0:0", "-N", str(max(entries * 2, 4096))]
    if not journal:
        args += ["-O", "^has_journal"]
    image.unlink(missing_ok=True)
    _run([*args, str(image), f"{size >> 10}k"], f"mke2fs {image}")
    return image


def system_image(cache_dir: Path | str = guest.DEFAULT_CACHE_DIR, python: Path | str = GUEST_PYTHON) -> Path:
    """The appliance's read-only system disk (see the module docstring), built once per input
    (``_system_cache_key``) into ``cache_dir``; returns its path."""
    interpreter = guest_interpreter(python)
    site = site_packages()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"appliance-system-{_system_cache_key(interpreter, site)}.ext4"
    if out.is_file():
        return out
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".appliance-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        counts = _stage_system(root, interpreter, site, Path(tmp))
        smoke = _smoke_test(root)
        tree, _ = _tree_bytes(root)
        part = make_ext4(Path(tmp) / "system.ext4", root, label="hbapp-sys", journal=False)
        os.replace(part, out)  # atomic: concurrent builders race harmlessly
    log.info("built %s in %.0f s: %.1f MiB of files (%s), image %.1f MiB; smoke test: %s", out,
             time.monotonic() - t0, tree / 2**20, counts, out.stat().st_size / 2**20, smoke)
    return out


# --------------------------------------------------------------------------- initramfs, repository

def _segment_key(kernel: guest.GuestKernel, modules: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    h.update(f"{_FORMAT_VERSION}\0{kernel.version}\0{START_SCRIPT}\0".encode())
    for name, path in modules:
        st = path.stat()
        h.update(f"{name}:{path}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def appliance_initramfs(lab: Lab) -> Path:
    """``migratable_initramfs(lab.initramfs)`` + a segment with EXTRA_MODULES (and what they need),
    the full module list /etc/hb/modules, and /appliance/start; cached in the lab's cache dir."""
    kernel = lab.kernel
    modules = guest.resolve_modules(kernel, guest.GUEST_MODULES + EXTRA_MODULES)
    base = lab.initramfs
    st = base.stat()
    key = hashlib.sha256(f"{_segment_key(kernel, modules)}\0{base.resolve()}:{st.st_size}:{st.st_mtime_ns}"
                         .encode()).hexdigest()[:16]
    out = lab.cache_dir / f"appliance-initramfs-{key}.cpio.gz"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=lab.cache_dir, prefix=".appliance-init-") as tmp:
        root = Path(tmp) / "root"
        for d in ("lib/modules", "etc/hb", "appliance"):
            (root / d).mkdir(parents=True)
        base_modules = {name for name, _ in guest.resolve_modules(kernel)}
        for name, path in modules:
            if name not in base_modules:
                (root / "lib/modules" / f"{name}.ko").write_bytes(guest._read_module(path))
        (root / "etc/hb/modules").write_text("".join(f"{name}\n" for name, _ in modules))
        start = root / "appliance/start"
        start.write_text(START_SCRIPT)
        start.chmod(0o755)
        seg = Path(tmp) / "appliance.cpio.gz"
        guest._pack_cpio(root, seg)
        migratable_initramfs(base, out, [seg])
    return out


def repository_disk(path: Path | str, size: int = DEFAULT_REPO_BYTES, tls: TlsConfig = NO_TLS) -> Path:
    """A raw disk image at ``path``: ext4 holding a new repository ``/DESTINATION`` (created here,
    on the host: no ``hyperback init`` under TCG) and, with ``tls``, the service's CA, certificate
    and key in ``/TLS_DIR`` (the service then speaks mutual TLS)."""
    from host_agent.storage.repository import Repository

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".repo-") as tmp:
        Repository.init(Path(tmp) / DESTINATION)
        if tls.enabled:
            assert tls.ca and tls.cert and tls.key
            (Path(tmp) / TLS_DIR).mkdir(mode=0o700)
            for src, name in ((tls.ca, "ca.pem"), (tls.cert, "service.pem"), (tls.key, "service.key")):
                shutil.copyfile(src, Path(tmp) / TLS_DIR / name)
        make_ext4(path, Path(tmp), size, label="hbapp-repo")
    return path


# --------------------------------------------------------------------------- the running appliance

@dataclass
class Appliance:
    """A started appliance: its domain (``name``; the ``Vm`` keeps the handle of the host it was
    started on), the media service's address and destination, its tap, and its disks."""

    vm: Vm
    system_image: Path
    repository_disk: Path
    memory_mib: int
    ip: str = APPLIANCE_IP
    port: int = MEDIA_PORT
    tap: str = TAP
    destination: str = DESTINATION
    ready_seconds: float = 0.0  # createXML to READY_MARKER, host clock

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def service(self) -> str:
        """The media service's address, HOST:PORT."""
        return f"{self.ip}:{self.port}"

    def route(self, lan_dev: str) -> ApplianceRoute:
        return ApplianceRoute(self.ip, self.tap, lan_dev)

    def console(self) -> str:
        return self.vm.console()

    def kernel_failure(self) -> str | None:
        """The guest kernel's fatal error on the console (see ``guest.kernel_failure``), or None."""
        return guest.kernel_failure(self.console())

    def wait_console(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait for ``pattern`` (regex, MULTILINE) on the console log, which both hosts' QEMUs
        append to: unlike ``Vm.wait_for_console`` this does not ask where the VM runs."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if FAILED_MARKER in self.vm.console():
                raise GuestStopped(f"{self.name}: the appliance failed to start", self.vm.console_tail())
            if time.monotonic() > deadline:
                raise VmLabError(f"{self.name}: no {pattern!r} on the console after {timeout:.0f} s:\n"
                                 f"{self.vm.console_tail()}")
            time.sleep(0.1)

    def destroy(self, *uris: str) -> list[str]:
        """Destroy the domain on each libvirt URI where it runs (it may have migrated); returns
        the URIs it was found on.  Idempotent."""
        libvirt = _libvirt()
        found = []
        for uri in uris:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as e:
                log.warning("cannot reach %s to destroy %s: %s", uri, self.name, e)
                continue
            try:
                dom = conn.lookupByName(self.name)
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
                found.append(uri)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise LibvirtFailure(f"destroying {self.name} on {uri}: {e}") from e
            finally:
                conn.close()
        return found


def start_appliance(lab: Lab, workdir: Path | str, *, memory_mib: int = DEFAULT_MEMORY_MIB,
                    repo_bytes: int = DEFAULT_REPO_BYTES, kernel_args: Sequence[str] = KERNEL_ARGS,
                    timeout: float = 240.0, tls: TlsConfig = NO_TLS) -> Appliance:
    """Start the appliance on the lab's host and wait until the media service listens.

    ``workdir`` receives the repository disk: it must be storage both hosts' daemons see (pytest's
    tmp_path, /var/tmp).  The system disk and the initramfs are cached in the lab's cache dir.
    The VM gets ``memory_mib`` MiB of RAM and one vCPU. With ``tls`` (a certificate naming
    ``APPLIANCE_IP``), the media service requires client certificates of its CA; without, it serves
    plain TCP (``--allow-plaintext``).
    """
    workdir = Path(workdir)
    system = system_image(lab.cache_dir)
    initrd = appliance_initramfs(lab)
    repo = repository_disk(workdir / "appliance-repo.img", repo_bytes, tls)
    disks = [Disk(system, target="vda", serial=SYSTEM_SERIAL, readonly=True),
             Disk(repo, target="vdb", serial=REPO_SERIAL)]
    t0 = time.monotonic()
    vm = start_migratable_vm(lab, NAME, command="exec /appliance/start", disks=disks, memory_mib=memory_mib,
                             initrd=initrd, extra_devices=[NIC_XML], kernel_args=kernel_args, timeout=timeout)
    app = Appliance(vm, system, repo, memory_mib)
    app.wait_console(rf"^{READY_MARKER} ", timeout)
    app.ready_seconds = time.monotonic() - t0
    log.info("appliance %s serving %s after %.1f s", app.name, app.service, app.ready_seconds)
    return app


# --------------------------------------------------------------------------- the route, per host

def lan_dev(host: str) -> str:
    """The LAN interface of lab host ``host`` ("a" or "b")."""
    if host not in ("a", "b"):
        raise ValueError(f"lab hosts are 'a' and 'b', not {host!r}")
    return LAN_A_IF if host == "a" else LAN_B_IF


def _route_on(hosts: TwoHosts, host: str, method: str) -> None:
    """Run ``ApplianceRoute(...).<method>()`` in ``host``'s network namespace: host A's is this
    process's, host B's is entered by a child (``nsenter`` into B's libvirtd's namespaces)."""
    route = ApplianceRoute(APPLIANCE_IP, TAP, lan_dev(host))
    if host == "a":
        getattr(route, method)()
        return
    pid = hosts.libvirtd_pid_b
    if pid is None:
        raise VmLabError("host B's libvirtd is not running")
    code = (f"from host_agent.colocation.serviceip import ApplianceRoute\n"
            f"ApplianceRoute({route.ip!r}, {route.tap!r}, {route.lan_dev!r}).{method}()\n")
    r = subprocess.run(["nsenter", f"--target={pid}", "--net", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise VmLabError(f"{method} of {route} on host B failed: {r.stderr.strip()[-2000:]}")


def claim_route(hosts: TwoHosts, host: str) -> None:
    """Host ``host`` ("a"/"b") routes the appliance's address to the appliance's tap there."""
    _route_on(hosts, host, "claim")


def release_route(hosts: TwoHosts, host: str) -> None:
    """Host ``host`` ("a"/"b") stops routing the appliance's address (its tap may be gone)."""
    _route_on(hosts, host, "release")


__all__ = [
    "APPLIANCE_IP", "APPLIANCE_MAC", "DESTINATION", "MEDIA_PORT", "NIC_XML", "READY_MARKER", "TAP",
    "Appliance", "appliance_initramfs", "claim_route", "lan_dev", "make_ext4", "release_route",
    "repository_disk", "start_appliance", "system_image",
]
