"""Guests that can live-migrate between the lab's two hosts (``host_agent.lab.twohosts``).

``migratable_guest_xml`` / ``start_migratable_vm`` boot a guest that can migrate: the lab's kernel
and initramfs with a replacement /init that runs the command from the initramfs's busybox (no 9p
mount, which blocks migration), a disk on storage both daemons see, the agent channel, and a
console log opened in append mode (the destination QEMU reopens it).  With ``python=True`` the
initramfs also carries the host's Python, the stdlib the guest shim needs and the shim itself
(``python_segment``, built once and cached): the command may then run ``hyperback-shim ...``::

    vm = start_migratable_vm(lab, "g", command=shim_command("list", "--json"), python=True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import guest
from .domain import BASE_KERNEL_ARGS, Channel, Disk, Lab, Vm, _libvirt, render_domain_xml, running_guests
from .errors import GuestBuildError, HostNotReady, LibvirtFailure, VmLabError

log = logging.getLogger(__name__)


# --- a guest that can migrate -----------------------------------------------------------------

# /init of a migratable guest: like init.sh, but no 9p and no chroot: the command runs on the
# initramfs's busybox (and, in a python guest, on the Python in /usr/bin with the guest shim under
# /opt/hyperback: see python_segment).  Same console markers (HB-READY, HB-EXIT).
MIGRATABLE_INIT = """\
#!/bin/sh
export PATH=/bin:/usr/bin
export PYTHONPATH=/opt/hyperback
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


def migratable_initramfs(base: Path, out: Path, extra_segments: Sequence[Path] = ()) -> Path:
    """``out`` = the lab initramfs ``base`` + a cpio segment replacing /init by MIGRATABLE_INIT
    + ``extra_segments`` (gzip'd newc archives, e.g. ``python_segment``), in that order.

    Written through a temporary file and renamed: a concurrent reader never sees half a file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".init-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        init = root / "init"
        init.write_text(MIGRATABLE_INIT)
        init.chmod(0o755)
        seg = Path(tmp) / "seg.cpio.gz"
        guest._pack_cpio(root, seg)
        part = Path(tmp) / "initramfs.cpio.gz"
        with open(part, "wb") as f:
            for src in (base, seg, *extra_segments):
                f.write(b"\0" * ((-f.tell()) % 4))  # cpio segments start 4-byte aligned
                with open(src, "rb") as b:
                    shutil.copyfileobj(b, f)
        os.replace(part, out)
    return out


# --- a migratable guest that runs the guest shim ----------------------------------------------
#
# The 9p guests run the host's Python from the host's root; a migratable guest cannot mount it, so
# ``python_segment`` packs a Python into the initramfs: the interpreter and the libraries ldd
# names, the part of the stdlib the guest shim imports (found by running it, see _COLLECT_SCRIPT),
# compiled, and the guest shim under /opt/hyperback.  ``hyperback-shim ARGS`` (or
# ``python3 -m guest_shim ARGS``) then works from the guest's shell.

# The distribution's interpreter: stripped, with most extension modules built in, so few files to
# copy.  Not the venv's: it may sit on a pyenv build whose libpython alone is 23 MB of debug info.
# The shim is stdlib-only and supports Python 3.9+, so any host Python serves.
GUEST_PYTHON = Path("/usr/bin/python3")
GUEST_SHIM_SOURCE = Path(__file__).resolve().parents[2] / "guest_shim"
GUEST_SHIM_HOME = "/opt/hyperback"  # PYTHONPATH in MIGRATABLE_INIT: holds guest_shim/
SHIM_COMMAND = "/bin/hyperback-shim"
SHIM_WRAPPER = f"""\
#!/bin/sh
# hyperback's guest shim on the initramfs's Python (hyperback vmlab)
export PYTHONPATH={GUEST_SHIM_HOME}
exec /usr/bin/python3 -m guest_shim "$@"
"""

# Stdlib modules imported only if present, with a fallback otherwise, that pull in shared libraries
# the shim has no use for.  Left out; the build's smoke test shows the shim runs without them.
OPTIONAL_MODULES = {
    "_hashlib": "OpenSSL's libcrypto (4.6 MB); hashlib and hmac fall back to the built-in _sha256 etc.",
    "bz2": "only for shutil's archive formats",
    "_bz2": "libbz2, for bz2",
    "lzma": "only for shutil's archive formats",
    "_lzma": "liblzma, for lzma",
}

# The shim command lines run to find the modules imported at run time (argparse's help formatter,
# the error paths), with a configuration whose port and socket do not exist.
SHIM_EXERCISE = (
    ("--help",),
    ("--version",),
    ("backup", "--help"),
    ("restore", "--help"),
    ("status", "--help"),
    ("list", "--help"),
    ("serve", "--help"),
    ("--json", "list"),
    ("status", "job-1"),
    ("backup", "--no-such-option"),
)
_EXERCISE_CONFIG = "[shim]\nport = unix:/nonexistent/hb-port\nsocket = /nonexistent/hb-serve.sock\n"

# Runs on the guest's interpreter: argv = mode ("collect" | "check"), the folder holding guest_shim/,
# the configuration file, the output file (JSON), then one argument per exercise command line (its
# words separated by spaces).  Imports every module of the shim, runs each command line as
# ``python3 -m guest_shim`` would (runpy), then writes the exit codes and, for "collect", every
# module loaded with its origin.  json is imported only after sys.modules has been read, so the list
# holds what the shim needs and no more.
_COLLECT_SCRIPT = r"""
import os, runpy, sys
mode, home, config, out = sys.argv[1:5]
sys.path.insert(0, home)
import site  # the guest's interpreter imports it at startup; collect runs with -S
for f in sorted(os.listdir(os.path.join(home, "guest_shim"))):
    if f.endswith(".py") and f != "__main__.py":
        __import__("guest_shim" if f == "__init__.py" else "guest_shim." + f[:-3])
codes = []
for line in sys.argv[5:]:
    argv = line.split()
    sys.argv = ["hyperback-shim", "-c", config, *argv]
    try:
        runpy.run_module("guest_shim", run_name="__main__", alter_sys=True)
        codes.append(None)
    except SystemExit as e:
        codes.append(e.code)
mods = []
if mode == "collect":
    for name, m in list(sys.modules.items()):
        spec = getattr(m, "__spec__", None)
        mods.append([name, getattr(spec, "origin", None) or ""])
result = {"codes": codes, "modules": mods, "stdlib": os.path.dirname(os.__file__),
          "cache_tag": sys.implementation.cache_tag}
import json
with open(out, "w") as f:
    json.dump(result, f)
"""

# Runs on the guest's interpreter: compiles [source, pyc, name in tracebacks] triples (JSON, stdin).
# Unchecked hash-based pycs: never compared with a source, which the stdlib ones do not have.
_COMPILE_SCRIPT = r"""
import json, py_compile, sys
for src, dst, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""

_PY_FORMAT_VERSION = "1"  # bump to invalidate cached python segments


@dataclass(frozen=True)
class GuestPython:
    """What the guest's Python consists of: ``interpreter`` (the real file), its ``stdlib`` folder,
    and the stdlib files the shim loads: ``sources`` (.py) and ``extensions`` (.so)."""

    interpreter: Path
    stdlib: Path
    cache_tag: str
    sources: tuple[Path, ...]
    extensions: tuple[Path, ...]
    exit_codes: tuple[object, ...]  # of SHIM_EXERCISE on the host: the smoke test must match them


def guest_interpreter(python: Path | str = GUEST_PYTHON) -> Path:
    """The real interpreter file behind ``python`` (symlinks resolved).  Raises HostNotReady."""
    path = Path(python).resolve()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HostNotReady(f"{python} is not an executable Python (install python3)")
    return path


def _run_guest_python(
    args: Sequence[str], *, what: str, input: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a Python (or chroot) command line with the guest's environment (no LANG: C locale)."""
    env = {"PATH": "/bin:/usr/bin", "HOME": "/", "PYTHONPATH": GUEST_SHIM_HOME}
    try:
        r = subprocess.run(list(args), input=input, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestBuildError(f"{what}: {e}") from e
    if r.returncode != 0:
        raise GuestBuildError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def _exercise(mode: str, python: Sequence[str], home: str, work_in: Path, work_as: str) -> dict[str, Any]:
    """Run _COLLECT_SCRIPT on ``python`` (the interpreter's command line, maybe behind chroot)
    with the shim under ``home``; return its JSON.  ``work_in`` is a host folder the script sees
    as ``work_as`` (they differ under chroot)."""
    (work_in / "shim.conf").write_text(_EXERCISE_CONFIG)
    _run_guest_python(
        [*python, "-c", _COLLECT_SCRIPT, mode, home, f"{work_as}/shim.conf", f"{work_as}/out.json",
         *(" ".join(argv) for argv in SHIM_EXERCISE)],
        what=f"running the guest shim on {' '.join(python)} ({mode})",
    )
    result: dict[str, Any] = json.loads((work_in / "out.json").read_text())
    return result


def collect_guest_python(interpreter: Path) -> GuestPython:
    """Find the stdlib files ``interpreter`` loads to import and run the guest shim.

    Runs the shim's modules and SHIM_EXERCISE on ``interpreter`` (-S -E -s: no site-packages, so
    nothing but the stdlib can satisfy an import) and reads sys.modules.  Frozen and built-in
    modules need no file; OPTIONAL_MODULES are left out.  Raises GuestBuildError if the shim loads
    anything from outside the stdlib (it must stay stdlib-only).
    """
    with tempfile.TemporaryDirectory(prefix="hb-pycollect-") as tmp:
        python = [str(interpreter), "-S", "-E", "-s", "-B"]
        found = _exercise("collect", python, str(GUEST_SHIM_SOURCE.parent), Path(tmp), tmp)
    stdlib = Path(found["stdlib"])
    sources: set[Path] = set()
    extensions: set[Path] = set()
    for name, origin in found["modules"]:
        if name in OPTIONAL_MODULES or name == "__main__" or origin in ("", "built-in", "frozen"):
            continue
        path = Path(origin)
        if path.is_relative_to(GUEST_SHIM_SOURCE):
            continue  # copied whole by _stage_shim
        if not path.is_relative_to(stdlib):
            raise GuestBuildError(
                f"the guest shim imports {name} from {path}, outside the stdlib ({stdlib}): "
                "guest_shim must use the standard library only"
            )
        (extensions if path.suffix == ".so" else sources).add(path)
    return GuestPython(
        interpreter, stdlib, found["cache_tag"], tuple(sorted(sources)), tuple(sorted(extensions)),
        tuple(found["codes"]),
    )


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+) \(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries and the dynamic loader ``ldd`` names for ``binary``, as ldd names
    them (the paths the loader looks at; no vDSO).  Raises GuestBuildError for a missing one."""
    try:
        r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    except FileNotFoundError as e:
        raise HostNotReady("ldd not found (install libc-bin)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"ldd {binary}: {(e.stdout + e.stderr).strip()}") from e
    libs = []
    for line in r.stdout.splitlines():
        if "not found" in line:
            raise GuestBuildError(f"ldd {binary}: {line.strip()} (install the library)")
        m = _LDD_LINE.match(line)
        if m and m.group(2).startswith("/"):
            libs.append(Path(m.group(2)))
    return libs


def _copy_in(root: Path, path: Path) -> None:
    """Copy ``path``'s content (symlinks followed) to the same path under ``root``."""
    dst = root / path.relative_to("/")
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)  # copy2 follows symlinks: the guest gets the file itself


def _stage_python(root: Path, py: GuestPython) -> None:
    """Put ``py`` under ``root``: interpreter, libraries, the stdlib files as sourceless .pyc (no
    compiling in the guest, which is slow under TCG), and the landmark the interpreter looks for to
    find its stdlib (lib/pythonX.Y/os.py: os itself is frozen into the interpreter)."""
    _copy_in(root, py.interpreter)
    link = root / GUEST_PYTHON.relative_to("/")
    if not link.exists():
        link.symlink_to(py.interpreter)  # /usr/bin/python3 -> /usr/bin/python3.11
    for binary in (py.interpreter, *py.extensions):
        for lib in shared_libraries(binary):
            _copy_in(root, lib)
    for ext in py.extensions:
        _copy_in(root, ext)
    _copy_in(root, py.stdlib / "os.py")
    triples = [
        (str(src), str(root / src.relative_to("/").with_suffix(".pyc")), str(src)) for src in py.sources
    ]
    for _, dst, _ in triples:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    _run_guest_python(
        [str(py.interpreter), "-S", "-E", "-c", _COMPILE_SCRIPT], input=json.dumps(triples),
        what="compiling the guest's stdlib",
    )


def _stage_shim(root: Path, py: GuestPython) -> None:
    """guest_shim/*.py under GUEST_SHIM_HOME with their pycs beside them, and SHIM_COMMAND."""
    dst_dir = root / GUEST_SHIM_HOME.lstrip("/") / "guest_shim"
    dst_dir.mkdir(parents=True)
    triples = []
    for src in sorted(GUEST_SHIM_SOURCE.glob("*.py")):
        shutil.copy2(src, dst_dir / src.name)
        pyc = dst_dir / "__pycache__" / f"{src.stem}.{py.cache_tag}.pyc"
        triples.append((str(src), str(pyc), f"{GUEST_SHIM_HOME}/guest_shim/{src.name}"))
    (dst_dir / "__pycache__").mkdir()
    _run_guest_python(
        [str(py.interpreter), "-S", "-E", "-c", _COMPILE_SCRIPT], input=json.dumps(triples),
        what="compiling the guest shim",
    )
    wrapper = root / SHIM_COMMAND.lstrip("/")
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(SHIM_WRAPPER)
    wrapper.chmod(0o755)


def _smoke_test(root: Path, py: GuestPython) -> None:
    """Run SHIM_EXERCISE chrooted in ``root`` as the guest will (plain ``python3``, site and all,
    PYTHONPATH) and require the host's exit codes: a module missing from the tree fails here, at
    build time, rather than in a guest under TCG.  Needs root (chroot); skipped otherwise."""
    chroot = shutil.which("chroot")
    if os.geteuid() != 0 or chroot is None:
        log.info("not root or no chroot: skipping the smoke test of the guest's Python")
        return
    work = root / "hb-smoke"
    work.mkdir()
    try:
        chrooted = [chroot, str(root), str(GUEST_PYTHON), "-B"]
        found = _exercise("check", chrooted, GUEST_SHIM_HOME, work, "/hb-smoke")
    finally:
        shutil.rmtree(work)
    if tuple(found["codes"]) != py.exit_codes:
        raise GuestBuildError(
            f"the guest shim in the initramfs's Python exits with {found['codes']} on {SHIM_EXERCISE}, "
            f"the host's with {list(py.exit_codes)}: a module it needs is missing from the tree "
            "(is one of OPTIONAL_MODULES needed after all?)"
        )


def _python_cache_key(interpreter: Path) -> str:
    """Changes when the interpreter file, the guest shim's sources or this builder change.

    The interpreter's size and mtime stand for its stdlib and libraries (Debian ships them with
    it); the shim's sources are hashed, as they change without their size changing."""
    h = hashlib.sha256()
    for part in (_PY_FORMAT_VERSION, _COLLECT_SCRIPT, _COMPILE_SCRIPT, SHIM_WRAPPER, _EXERCISE_CONFIG,
                 repr(SHIM_EXERCISE), repr(sorted(OPTIONAL_MODULES)), GUEST_SHIM_HOME):
        h.update(part.encode() + b"\0")
    st = interpreter.stat()
    h.update(f"{interpreter}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    for src in sorted(GUEST_SHIM_SOURCE.glob("*.py")):
        h.update(src.name.encode() + b"\0" + hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()[:16]


def python_segment(
    cache_dir: Path | str = guest.DEFAULT_CACHE_DIR, python: Path | str = GUEST_PYTHON
) -> Path:
    """The gzip'd cpio segment with a Python that runs the guest shim (see the section comment),
    built once per input (``_python_cache_key``) into ``cache_dir``; returns its path."""
    interpreter = guest_interpreter(python)
    if not GUEST_SHIM_SOURCE.is_dir():
        raise GuestBuildError(f"{GUEST_SHIM_SOURCE} missing: run from the hyperback checkout")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"python-{interpreter.name}-{_python_cache_key(interpreter)}.cpio.gz"
    if out.is_file():
        return out
    py = collect_guest_python(interpreter)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".python-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _stage_python(root, py)
        _stage_shim(root, py)
        _smoke_test(root, py)
        part = Path(tmp) / "seg.cpio.gz"
        guest._pack_cpio(root, part)
        os.replace(part, out)  # atomic: concurrent builders race harmlessly
    packed, unpacked = segment_sizes(out)
    log.info(
        "built %s: %d stdlib modules, %d extensions, %.1f MiB unpacked, %.1f MiB gzip'd",
        out, len(py.sources), len(py.extensions), unpacked / 2**20, packed / 2**20,
    )
    return out


def segment_sizes(segment: Path) -> tuple[int, int]:
    """(bytes on disk, bytes uncompressed) of a gzip'd segment (gzip's ISIZE: below 4 GiB)."""
    with open(segment, "rb") as f:
        f.seek(-4, os.SEEK_END)
        unpacked = int.from_bytes(f.read(4), "little")
    return segment.stat().st_size, unpacked


def migratable_python_initramfs(
    base: Path, cache_dir: Path | str = guest.DEFAULT_CACHE_DIR, python: Path | str = GUEST_PYTHON
) -> Path:
    """``migratable_initramfs(base)`` + ``python_segment``, cached in ``cache_dir`` (keyed on
    ``base``'s name, size and mtime, MIGRATABLE_INIT and the segment)."""
    seg = python_segment(cache_dir, python)
    st = base.stat()
    key = hashlib.sha256(
        f"{base.resolve()}:{st.st_size}:{st.st_mtime_ns}\0{MIGRATABLE_INIT}\0{seg.name}".encode()
    ).hexdigest()[:16]
    out = Path(cache_dir) / f"migratable-python-{key}.cpio.gz"
    if not out.is_file():
        migratable_initramfs(base, out, [seg])
    return out


def shim_command(*args: str) -> str:
    """The guest shell command running the guest shim with ``args`` (quoted): for the ``command``
    of a ``start_migratable_vm(..., python=True)`` guest."""
    return " ".join([SHIM_COMMAND, *(shlex.quote(a) for a in args)])


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
    extra_devices: Sequence[str] = (),
    kernel_args: Sequence[str] = (),
) -> str:
    """Domain XML of a guest that can live-migrate: the lab's XML without the 9p <filesystem>,
    the console log in append mode, the command on the kernel command line.

    ``initrd`` must be a ``migratable_initramfs``; every path (kernel, initrd, disks, console)
    must be one both daemons see (outside B's private folders: e.g. /var/tmp or pytest's tmp_path).
    ``extra_devices`` are device elements (XML text, e.g. an ``<interface>``) added to <devices>;
    ``kernel_args`` go on the kernel command line before the command.
    """
    cmd_arg = guest.command_cmdline_arg(command)
    if len(cmd_arg) > guest.MAX_CMDLINE_COMMAND:
        # the kernel would truncate the command line silently; MIGRATABLE_INIT reads no /hb/cmd
        raise VmLabError(
            f"command of {name} too long for the kernel command line ({len(cmd_arg)} > "
            f"{guest.MAX_CMDLINE_COMMAND} bytes as base64): shorten it"
        )
    cmdline = " ".join([*BASE_KERNEL_ARGS, *kernel_args, cmd_arg])
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
    for device in extra_devices:
        try:
            devices.append(ET.fromstring(device))
        except ET.ParseError as e:
            raise VmLabError(f"extra device of {name} is not well-formed XML: {e}") from e
    return ET.tostring(root, encoding="unicode")


def start_migratable_vm(
    lab: Lab,
    name: str,
    *,
    command: str,
    disks: Sequence[Disk] = (),
    memory_mib: int = 256,
    timeout: float = 120.0,
    python: bool = False,
    initrd: Path | None = None,
    extra_devices: Sequence[str] = (),
    kernel_args: Sequence[str] = (),
) -> Vm:
    """Start a migratable guest (transient) on the lab's connection and wait for HB-READY.

    ``command`` runs on the initramfs's busybox sh.  With ``python=True`` the initramfs also
    carries a Python and the guest shim (``python_segment``, cached in the lab's cache_dir):
    ``command`` may then run ``hyperback-shim ARGS`` (see ``shim_command``) or ``python3``.  The
    guest has the lab's default channel, the hyperback port the shim looks for.  ``initrd`` (a
    ``migratable_initramfs`` built by the caller, e.g. with extra segments) replaces the lab's;
    ``extra_devices`` and ``kernel_args`` go into the domain XML (see ``migratable_guest_xml``).

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
    if initrd is not None:
        if python:
            raise VmLabError("give either python=True or an initrd of your own, not both")
    elif python:
        initrd = migratable_python_initramfs(lab.initramfs, lab.cache_dir)
    else:
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
        extra_devices=extra_devices,
        kernel_args=kernel_args,
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
    up = re.search(r"^HB-READY uptime=([\d.]+)", vm.console(), re.MULTILINE)
    vm.guest_uptime_at_ready = float(up.group(1)) if up else None
    return vm
