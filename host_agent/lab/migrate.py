"""Live migration of a vmlab guest between two libvirt hosts (see ``twohosts.TwoHosts``).

::

    seconds = live_migrate("hbvl-demo", hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=60)

Peer-to-peer managed migration (``migrateToURI3`` with VIR_MIGRATE_PEER2PEER: the *source*
daemon connects to ``dst_uri``, so that URI must be valid where the source daemon runs; the
``TwoHosts`` URIs are valid in both namespaces).  The memory stream goes straight from QEMU to
QEMU over ``tcp://<dst_lan_ip>:<port>``, the destination listening on ``dst_lan_ip`` only.

Flags: VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER; no VIR_MIGRATE_PERSIST_DEST by default (vmlab
guests are transient: the domain then simply moves; ``persist=True`` adds PERSIST_DEST and
UNDEFINE_SOURCE for persistent domains).  VIR_MIGRATE_UNSAFE (``unsafe=None``, the default: decided
by ``needs_unsafe``) is added when a writable disk has a cache mode other than none/directsync, or
sits on a file system libvirt does not know as shared: libvirt 9.0 refuses ("Migration without
shared storage is unsafe") a disk on a local file system (ext4) even with cache='none'.  In the
two-hosts lab both daemons run on one kernel, so a local file outside B's private folders *is*
shared storage and UNSAFE is right there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any

from .domain import _libvirt
from .errors import LibvirtFailure

log = logging.getLogger(__name__)

MIGRATION_PORT = 49152


class MigrationFailed(LibvirtFailure):
    """A live migration failed or timed out; the domain was left running on the source (if it
    was running before).  ``__cause__`` is the libvirtError when libvirt reported one."""


class MigrationTimeout(MigrationFailed):
    """The migration did not finish within the timeout and was aborted."""


# file systems libvirt's virFileIsSharedFS recognises (as /proc/mounts names them)
SHARED_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "ceph",
        "gfs2",
        "ocfs2",
        "glusterfs",
        "fuse.glusterfs",
        "cifs",
        "smb3",
        "beegfs",
        "gpfs",
        "lustre",
        "fuse.quobyte",
        "vxfs",
    }
)


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount point prefix in /proc/mounts)."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, best_type = mnt, fields[2]
    return best_type


def needs_unsafe(domain_xml: str) -> bool:
    """True if libvirt would refuse to migrate the domain without VIR_MIGRATE_UNSAFE: a writable
    disk with a cache mode other than none/directsync, or on a file system that is not shared."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        source = disk.find("source")
        if source is None:
            continue
        driver = disk.find("driver")
        cache = driver.get("cache") if driver is not None else None
        if cache not in ("none", "directsync"):
            return True
        path = source.get("file") or source.get("dev")
        if path and fs_type(path) not in SHARED_FS_TYPES:
            return True
    return False


def live_migrate(
    domain_name: str,
    src_uri: str,
    dst_uri: str,
    dst_lan_ip: str,
    timeout: float = 60.0,
    *,
    port: int = MIGRATION_PORT,
    unsafe: bool | None = None,
    persist: bool = False,
) -> float:
    """Live-migrate running domain ``domain_name`` from ``src_uri`` to ``dst_uri``; return the
    seconds the migration took.  Raises MigrationFailed (MigrationTimeout when it was still going
    after ``timeout`` seconds: the job is then aborted), the domain left running on the source.
    A migration that completes although the abort was requested counts as a success."""
    libvirt = _libvirt()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(src_uri)
    except libvirt.libvirtError as e:
        raise MigrationFailed(f"migrate {domain_name}: cannot reach source {src_uri}: {e}") from e
    try:
        try:
            dom = conn.lookupByName(domain_name)
            if not dom.isActive():
                raise MigrationFailed(f"migrate {domain_name}: not running on {src_uri}")
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as e:
            raise MigrationFailed(f"migrate {domain_name}: {e}") from e

        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        if persist:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if unsafe if unsafe is not None else needs_unsafe(xml):
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        params = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst_lan_ip}:{port}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: dst_lan_ip,
        }

        result: list[BaseException | None] = []

        def run() -> None:
            try:
                dom.migrateToURI3(dst_uri, params, flags)
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                result.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=run, name=f"migrate-{domain_name}", daemon=True)
        worker.start()
        worker.join(timeout)
        timed_out = worker.is_alive()
        if timed_out:
            log.warning("migration of %s exceeded %g s, aborting", domain_name, timeout)
            try:
                dom.abortJob()
            except libvirt.libvirtError as e:
                log.warning("abortJob(%s): %s", domain_name, e)
            worker.join(30)
        seconds = time.monotonic() - t0
        err = result[0] if result else None
        if timed_out and result and err is None:
            # the abort came too late: the migration completed, the domain is on the destination
            log.warning("migration of %s completed after the abort request (%.2f s)", domain_name, seconds)
        elif err is not None or worker.is_alive():
            still = _still_running(dom)
            what = f"timed out after {timeout:g} s ({err})" if timed_out else f"failed: {err}"
            msg = (
                f"migrate {domain_name} {src_uri} -> {dst_uri} via {dst_lan_ip}:{port} {what} "
                f"({'still running' if still else 'NOT running'} on the source)"
            )
            cls = MigrationTimeout if timed_out else MigrationFailed
            raise cls(msg) from err
        log.info("migrated %s to %s in %.2f s", domain_name, dst_uri, seconds)
        return seconds
    finally:
        conn.close()


def _still_running(dom: Any) -> bool:
    libvirt = _libvirt()
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False
