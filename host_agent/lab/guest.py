"""The test guest: the host's own kernel plus a cached busybox initramfs.

The guest has no disk image of its own.  Its initramfs (busybox-static, the virtio and 9p modules
of the installed ``linux-image-amd64`` kernel, and ``init.sh`` as ``/init``) mounts the host's
root read-only over 9p and chroots into it, so the host's Python and the project checkout run
inside the guest.  The command to run travels base64-encoded on the kernel command line
(``hb.cmd=``); a command too long for the command line travels in a small cpio segment appended
to a per-VM copy of the initramfs (``/hb/cmd``).

Console protocol (ttyS0, see init.sh): ``HB-READY uptime=<s>`` just before the command starts,
``HB-EXIT <status>`` when it ends (255 when /init itself failed), then the guest powers off.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestBuildError, HostNotReady

log = logging.getLogger(__name__)

READY_MARKER = "HB-READY"
EXIT_RE = re.compile(r"^HB-EXIT (\d+)\s*$", re.MULTILINE)
INIT_FAILED_MARKER = "HB-INIT-FAILED"
# what a guest kernel prints when it dies or is about to (console lines, after its timestamp)
KERNEL_FAILURE_RE = re.compile(
    r"^\[\s*\d+\.\d+\]\s+((?:Kernel panic - not syncing|BUG:|Oops|general protection fault|invalid opcode"
    r"|double fault).*?)\s*$", re.MULTILINE)


def kernel_failure(console: str) -> str | None:
    """The first line in which the guest kernel reported a fatal error (panic, oops, protection
    fault) on ``console``, or None."""
    m = KERNEL_FAILURE_RE.search(console)
    return m.group(1) if m else None

DEFAULT_CACHE_DIR = Path("/var/tmp/hyperback-vmlab")
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("init.sh")

# Loaded in dependency order; their dependencies are added by resolve_modules().
# ext4 (and the crc32c it asks for by alias) lets tests mount file systems on guest disks.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "9pnet_virtio", "9p", "crc32c_generic", "ext4")

# x86 COMMAND_LINE_SIZE is 2048; leave room for the other arguments.
MAX_CMDLINE_COMMAND = 1500

_FORMAT_VERSION = "1"  # bump to invalidate cached initramfs images


@dataclass(frozen=True)
class GuestKernel:
    """An installed kernel usable as the guest's: its image and its module tree."""

    version: str
    image: Path
    modules_dir: Path


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version)]


def find_guest_kernel() -> GuestKernel:
    """The newest kernel under /lib/modules that has 9p.ko and a /boot/vmlinuz-<version>."""
    candidates = []
    for mdir in Path("/lib/modules").glob("*"):
        if not any((mdir / "kernel/fs/9p").glob("9p.ko*")):
            continue
        image = Path("/boot") / f"vmlinuz-{mdir.name}"
        if image.is_file():
            candidates.append(GuestKernel(mdir.name, image, mdir))
    if not candidates:
        raise HostNotReady(
            "no kernel with 9p.ko under /lib/modules and an image in /boot "
            "(install linux-image-amd64: run host_agent/lab/setup_host.sh)"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


def _modinfo(kernel: GuestKernel, field: str, module: str) -> str:
    try:
        out = subprocess.run(
            ["modinfo", "-k", kernel.version, "-F", field, module],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as e:
        raise HostNotReady("modinfo not found (install kmod)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"modinfo {module} for {kernel.version}: {e.stderr.strip()}") from e
    return out.stdout.strip()


def resolve_modules(kernel: GuestKernel, wanted: tuple[str, ...] = GUEST_MODULES) -> list[tuple[str, Path]]:
    """``(name, file)`` for ``wanted`` and all their dependencies, dependencies first.

    Built-in modules (no file) are left out.
    """
    ordered: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        for dep in filter(None, _modinfo(kernel, "depends", name).split(",")):
            visit(dep.strip(), chain + (name,))
        seen.add(name)
        filename = _modinfo(kernel, "filename", name)
        if filename and not filename.startswith("("):  # "(builtin)"
            ordered.append((name, Path(filename)))

    for name in wanted:
        visit(name, ())
    return ordered


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes; busybox insmod wants them uncompressed."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        try:
            return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise GuestBuildError(f"cannot decompress {path} (install zstd)") from e
    return data


def _busybox_applets() -> list[str]:
    try:
        out = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise HostNotReady(f"{BUSYBOX} unusable (install busybox-static)") from e
    return [a for a in out.stdout.split() if a and "/" not in a]


def _check_static(path: Path) -> None:
    head = path.read_bytes()[:4096]
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise HostNotReady(f"{path} is dynamically linked (install busybox-static)")


def _pack_cpio(root: Path, out: Path) -> None:
    """``find | cpio -o -H newc | gzip`` of ``root`` into ``out``, owned by root:root."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    try:
        cpio = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=root,
            input="\n".join(names).encode() + b"\n",
            check=True,
            capture_output=True,
        )
    except FileNotFoundError as e:
        raise HostNotReady("cpio not found (install cpio)") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"cpio failed: {e.stderr.decode(errors='replace')}") from e
    with open(out, "wb") as f:
        f.write(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))


def _cache_key(kernel: GuestKernel, modules: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    h.update(_FORMAT_VERSION.encode())
    h.update(kernel.version.encode())
    h.update(INIT_SCRIPT.read_bytes())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    for name, path in modules:
        st = path.stat()
        h.update(f"{name}:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_initramfs(
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    kernel: GuestKernel | None = None,
    modules: tuple[str, ...] = GUEST_MODULES,
) -> Path:
    """Build (or reuse from ``cache_dir``) the guest initramfs for ``kernel``; return its path."""
    kernel = kernel or find_guest_kernel()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not BUSYBOX.is_file():
        raise HostNotReady(f"{BUSYBOX} missing (install busybox-static)")
    _check_static(BUSYBOX)
    resolved = resolve_modules(kernel, modules)
    out = cache_dir / f"initramfs-{kernel.version}-{_cache_key(kernel, resolved)}.cpio.gz"
    if out.is_file():
        log.debug("reusing %s", out)
        return out

    log.info("building %s (%d modules)", out, len(resolved))
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "etc/hb", "lib/modules", "mnt", "proc", "sys", "tmp", "hb"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for applet in _busybox_applets():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        init = root / "init"
        shutil.copyfile(INIT_SCRIPT, init)
        init.chmod(0o755)
        for name, path in resolved:
            (root / "lib/modules" / f"{name}.ko").write_bytes(_read_module(path))
        (root / "etc/hb/modules").write_text("".join(f"{name}\n" for name, _ in resolved))
        if os.geteuid() == 0:
            os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        part = Path(tmp) / "initramfs.cpio.gz"
        _pack_cpio(root, part)
        os.replace(part, out)  # atomic: concurrent builders race harmlessly
    return out


def _pvh_capable(kernel: GuestKernel) -> bool:
    config = Path("/boot") / f"config-{kernel.version}"
    try:
        return "\nCONFIG_PVH=y\n" in config.read_text()
    except OSError:
        return False


def _extract_elf(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage whose payload is xz or gzip, else None."""
    import lzma
    import zlib

    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08"):
        at = bzimage.find(magic)
        while at >= 0:
            try:
                if magic[0] == 0xFD:
                    elf = lzma.LZMADecompressor().decompress(bzimage[at:])
                else:
                    elf = zlib.decompressobj(31).decompress(bzimage[at:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            at = bzimage.find(magic, at + 1)
    return None


def boot_image(cache_dir: Path | str = DEFAULT_CACHE_DIR, kernel: GuestKernel | None = None) -> Path:
    """The image to boot: the uncompressed ELF vmlinux (cached), else the bzImage itself.

    QEMU boots an ELF vmlinux that has a PVH entry note (CONFIG_PVH=y, as in Debian's kernels)
    directly, which skips the in-guest decompression: under TCG that saves ~3 s of every boot.
    Falls back to the bzImage when the payload is not xz/gzip or the kernel lacks PVH.
    """
    kernel = kernel or find_guest_kernel()
    if not _pvh_capable(kernel):
        return kernel.image
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    st = kernel.image.stat()
    out = cache_dir / f"vmlinux-{kernel.version}-{st.st_size}-{st.st_mtime_ns}"
    if out.is_file():
        return out
    elf = _extract_elf(kernel.image.read_bytes())
    if elf is None:
        log.info("%s: cannot extract vmlinux; booting the bzImage (slower)", kernel.image)
        return kernel.image
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".vmlinux-", delete=False) as f:
        f.write(elf)
    os.replace(f.name, out)
    log.info("extracted %s (%d MiB)", out, len(elf) >> 20)
    return out


def command_cmdline_arg(command: str) -> str:
    """The ``hb.cmd=<base64>`` kernel argument carrying ``command``."""
    return "hb.cmd=" + base64.b64encode(command.encode()).decode()


def initramfs_with_command(base: Path, command: str, out: Path) -> Path:
    """Write ``out`` = ``base`` + a gzip'd cpio segment holding ``/hb/cmd``.

    The kernel unpacks concatenated cpio archives in order, so /init finds /hb/cmd.  Used for
    commands too long for the kernel command line.
    """
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".cmd-") as tmp:
        root = Path(tmp) / "root"
        (root / "hb").mkdir(parents=True)
        (root / "hb/cmd").write_text(command)
        seg = Path(tmp) / "seg.cpio.gz"
        _pack_cpio(root, seg)
        with open(out, "wb") as f:
            with open(base, "rb") as b:
                shutil.copyfileobj(b, f)
            # cpio segments must start 4-byte aligned
            pad = (-f.tell()) % 4
            f.write(b"\0" * pad)
            f.write(seg.read_bytes())
    return out
