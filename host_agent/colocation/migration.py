"""Moving a domain between hypervisor hosts through libvirt, safely.

Two ways, both leaving the domain *running on exactly one host* whatever happens:

* :func:`live_migrate`: peer-to-peer managed live migration (``migrateToURI3`` with
  VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER: the *source* daemon connects to ``dst_uri``, so that URI
  must be valid where the source daemon runs).  The memory stream goes straight from QEMU to QEMU
  over ``tcp://<dst_lan_ip>`` (a port libvirt picks), the destination listening on that address
  only.  A persistent domain gets PERSIST_DEST | UNDEFINE_SOURCE, so it is defined on one host before
  and after.  After
  ``timeout`` seconds the job is aborted; a failed or aborted migration leaves the domain running on
  the source (libvirt resumes it), and the error says where it runs.
* :func:`cold_move` for a domain that cannot live-migrate (host devices): shut down (destroyed after
  ``shutdown_timeout``), undefine on the source, define and boot on the target; if the target fails,
  define and boot it on the source again.  It is never defined on two hosts at once.

A TCG guest (``<domain type='qemu'>``) on QEMU before 9.0 is migrated *paused* (no
VIR_MIGRATE_LIVE): those QEMUs can lose a TCG guest's memory writes during a live migration, and the
guest arrives corrupt (see :data:`TCG_LIVE_MIGRATION_FIXED`).  It stops for the copy instead.

VIR_MIGRATE_UNSAFE (``unsafe=None``: decided by :func:`needs_unsafe`) is added when a writable disk
has a cache mode other than none/directsync, or sits on a file system libvirt does not know as
shared: libvirt 9.0 refuses a disk on a local file system even with cache='none', although on one
kernel (the two-host lab) or a cluster file system it is shared.  The inventory's ``shared_storage``
is what hyperback trusts; libvirt's own check is the one being overridden.

While hyperback moves a domain for a job it carries a *visit marker* in its metadata
(``<hbv:visit origin='HOST' job='ID'/>`` in namespace :data:`VISIT_NS`): it travels with the
domain, tells the host it visits not to serve its channel (the job's guest waits for its origin),
and refuses a second move while one is under way.  A domain is marked not live-migratable by
``<hb:placement live-migratable='no'/>`` in namespace :data:`METADATA_NS`, or by having host
devices.  The two have separate namespaces because libvirt keeps one element per namespace: a
marker written into the operator's namespace would replace the operator's setting.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.errors import HypervisorError, MigrationFailed, MigrationTimeout, MoveError, MoveInProgress

log = logging.getLogger(__name__)

METADATA_NS = "https://hyperback.dev/xmlns/placement/1"   # the operator's settings for moves
METADATA_PREFIX = "hb"
VISIT_NS = "https://hyperback.dev/xmlns/visit/1"          # hyperback's own, while a move is under way
VISIT_PREFIX = "hbv"


@dataclass(frozen=True)
class MoveStats:
    seconds: float
    bytes: int          # bytes the migration stream carried (libvirt's data_processed); 0 for a cold move
    downtime_ms: int    # how long the guest was paused (live) or off (cold)


@dataclass(frozen=True)
class VisitMarker:
    origin: str         # the host the domain belongs to
    job: str            # the job it moved for


# QEMU before 9.0 loses TCG guest writes in a live migration: the fast path of
# cpu_physical_memory_sync_dirty_bitmap() clears dirty bits without resetting TCG's TLB, so stores
# through entries already marked dirty are never sent (upstream 03bfc2188f, "physmem: Fix migration
# dirty bitmap coherency with TCG memory access").  Seen in the two-host lab on Debian 12's 7.2.
TCG_LIVE_MIGRATION_FIXED = 9_000_000   # libvirt's version encoding: major * 1,000,000 + minor * 1,000


def live_migration_is_safe(domain_xml: str, qemu_version: int) -> bool:
    """False for a TCG guest on a QEMU whose live migration can corrupt it (migrate it paused)."""
    return ET.fromstring(domain_xml).get("type") != "qemu" or qemu_version >= TCG_LIVE_MIGRATION_FIXED


# file systems libvirt's virFileIsSharedFS recognises (as /proc/mounts names them)
SHARED_FS_TYPES = frozenset({"nfs", "nfs4", "ceph", "gfs2", "ocfs2", "glusterfs", "fuse.glusterfs", "cifs",
                             "smb3", "beegfs", "gpfs", "lustre", "fuse.quobyte", "vxfs"})


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


def live_migratable(domain_xml: str) -> tuple[bool, str]:
    """Whether the domain can live-migrate, and if not why (for people)."""
    root = ET.fromstring(domain_xml)
    hostdevs = root.findall("./devices/hostdev")
    if hostdevs:
        return False, f"{len(hostdevs)} host device(s) passed through"
    placement = root.find(f"./metadata/{{{METADATA_NS}}}placement")
    if placement is not None and placement.get("live-migratable", "yes").lower() in ("no", "false", "0"):
        return False, "its metadata marks it not live-migratable"
    return True, ""


def visit_marker(domain_xml: str) -> VisitMarker | None:
    root = ET.fromstring(domain_xml)
    visit = root.find(f"./metadata/{{{VISIT_NS}}}visit")
    if visit is None or not visit.get("origin"):
        return None
    return VisitMarker(visit.get("origin", ""), visit.get("job", ""))


def _affect(dom: Any) -> int:
    flags = int(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def mark_visit(dom: Any, origin: str, job: str) -> None:
    """Put the visit marker on ``dom``; MoveInProgress if it already carries one."""
    dom = hypervisor.guard(dom)
    existing = visit_marker(dom.XMLDesc(0))
    if existing is not None:
        raise MoveInProgress(f"{dom.name()} is already being moved (job {existing.job} of host "
                             f"{existing.origin}); one move per VM at a time")
    root = ET.Element("visit", origin=origin, job=job)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ET.tostring(root, encoding="unicode"),
                        VISIT_PREFIX, VISIT_NS, _affect(dom))
    except HypervisorError as e:
        raise MoveError(f"cannot mark {dom.name()} for a move: {e}") from e


def clear_visit(dom: Any) -> None:
    dom = hypervisor.guard(dom)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, VISIT_PREFIX, VISIT_NS, _affect(dom))
    except HypervisorError as e:
        log.warning("could not clear the visit marker of %s: %s", dom.name(), e)


def _open(uri: str, what: str) -> Any:
    try:
        return hypervisor.connect(uri)
    except HypervisorError as e:
        raise MoveError(f"the {what} host: {e}") from e


def _lookup(conn: Any, name: str, where: str) -> Any:
    try:
        return conn.lookupByName(name)
    except HypervisorError as e:
        raise MoveError(f"domain {name} is not on {where}: {e}") from e


def _running(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except HypervisorError:
        return False


def _completed_stats(dst_uri: str, name: str) -> tuple[int, int]:
    """(bytes, downtime ms) of the last migration, as the destination recorded them."""
    try:
        conn = hypervisor.connect(dst_uri)
        try:
            # keep them: operators (virsh domjobinfo --completed) may want to read them as well
            stats = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                                     | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
        finally:
            conn.close()
    except HypervisorError as e:
        log.info("no migration statistics for %s: %s", name, e)
        return 0, 0
    return int(stats.get("data_processed", 0)), int(stats.get("downtime", 0))


def live_migrate(domain_name: str, src_uri: str, dst_uri: str, dst_lan_ip: str, timeout: float = 300.0, *,
                 port: int = 0, unsafe: bool | None = None,
                 bandwidth_mib: int = 0) -> MoveStats:
    """Live-migrate running domain ``domain_name`` from ``src_uri`` to ``dst_uri``.

    ``bandwidth_mib`` caps the stream (MiB/s, 0: no cap).  Raises MigrationFailed (MigrationTimeout
    after ``timeout`` seconds: the job is then aborted), the domain left running on the source.  A
    migration that completes although the abort was requested counts as a success.
    """
    conn = _open(src_uri, "source")
    try:
        dom = _lookup(conn, domain_name, src_uri)
        try:
            if not dom.isActive():
                raise MigrationFailed(f"migrate {domain_name}: not running on {src_uri}")
            xml = dom.XMLDesc(0)
            persistent = bool(dom.isPersistent())
            live = live_migration_is_safe(xml, conn.getVersion())
        except HypervisorError as e:
            raise MigrationFailed(f"migrate {domain_name}: {e}") from e
        flags = libvirt.VIR_MIGRATE_PEER2PEER
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        else:
            log.warning("%s is a TCG guest and QEMU is older than 9.0, whose live migration can lose its "
                        "writes: migrating it paused", domain_name)
        if persistent:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if unsafe if unsafe is not None else needs_unsafe(xml):
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        # without a port libvirt takes a free one of its migration range: several may arrive at once
        uri = f"tcp://{dst_lan_ip}" + (f":{port}" if port else "")
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: uri,
                                  libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: dst_lan_ip}
        if bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
        what = f"{domain_name} {src_uri} -> {dst_uri} via {uri}"
        seconds = _run_migration(dom, dst_uri, params, flags, timeout, what)
    finally:
        conn.close()
    data, downtime = _completed_stats(dst_uri, domain_name)
    log.info("migrated %s to %s in %.2f s (%d bytes)", domain_name, dst_uri, seconds, data)
    return MoveStats(seconds, data, downtime)


def _run_migration(dom: Any, dst_uri: str, params: dict[str, Any], flags: int, timeout: float,
                   what: str) -> float:
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            dom.migrateToURI3(dst_uri, params, flags)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=run, name="migrate", daemon=True)
    worker.start()
    worker.join(timeout)
    timed_out = worker.is_alive()
    if timed_out:
        log.warning("migration %s exceeded %g s, aborting", what, timeout)
        try:
            dom.abortJob()
        except HypervisorError as e:
            log.warning("abortJob: %s", e)
        worker.join(60)
    seconds = time.monotonic() - t0
    err = result[0] if result else None
    if timed_out and result and err is None:
        log.warning("migration %s completed after the abort request (%.2f s)", what, seconds)
        return seconds
    if worker.is_alive():
        # libvirt ignored the abort: the migration may still complete, so nothing can be promised
        raise MigrationTimeout(f"migrate {what} timed out after {timeout:g} s and ignores the abort; "
                               f"check where the domain runs ('virsh list' on both hosts)")
    if err is not None:
        where = "still running on the source" if _resume_if_paused(dom) else "NOT running on the source"
        why = f"timed out after {timeout:g} s" if timed_out else f"failed: {err}"
        cls = MigrationTimeout if timed_out else MigrationFailed
        raise cls(f"migrate {what} {why} ({where})") from err
    return seconds


def _resume_if_paused(dom: Any) -> bool:
    """After a failed migration: resume a source left paused; True if it runs now."""
    try:
        state, _reason = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            log.warning("%s was left paused by the failed migration; resuming it", dom.name())
            dom.resume()
        return bool(dom.isActive()) and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    except HypervisorError:
        return False


# undefine although hyperback's checkpoints (and any snapshots) exist; keep UEFI variables on disk
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)


def cold_move(domain_name: str, src_uri: str, dst_uri: str, *, shutdown_timeout: float = 60.0,
              rescue_dir: str = "/var/lib/hyperback") -> MoveStats:
    """Stop ``domain_name`` on ``src_uri``, define and boot it on ``dst_uri``.

    The guest is asked to shut down and destroyed after ``shutdown_timeout`` seconds.  If the target
    cannot define or boot it, it is defined and booted on the source again and MoveError says so.
    Should that fail too, its definition is written to ``rescue_dir`` and the error names the file.
    """
    t0 = time.monotonic()
    src = _open(src_uri, "source")
    try:
        dom = _lookup(src, domain_name, src_uri)
        try:
            persistent = bool(dom.isPersistent())
            # the definition, not the live state: no host-local paths libvirt generated here
            flags = (libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE
                     | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
            xml = dom.XMLDesc(flags)
        except HypervisorError as e:
            raise MoveError(f"cold move of {domain_name}: {e}") from e
        dst = _open(dst_uri, "target")
        try:
            _stop(dom, shutdown_timeout)
            stopped = time.monotonic()
            try:
                if persistent:
                    dom.undefineFlags(_UNDEFINE_FLAGS)
                _boot(dst, xml, persistent)
            except HypervisorError as e:
                log.error("moving %s to %s failed (%s); booting it on %s again", domain_name, dst_uri, e,
                          src_uri)
                _boot_back(src, xml, persistent, domain_name, rescue_dir, e)
                raise MoveError(f"cold move of {domain_name} to {dst_uri} failed: {e}; it runs on "
                                f"{src_uri} again") from e
        finally:
            dst.close()
    finally:
        src.close()
    seconds = time.monotonic() - t0
    log.info("moved %s cold to %s in %.2f s", domain_name, dst_uri, seconds)
    return MoveStats(seconds, 0, round((time.monotonic() - stopped) * 1000))


def _stop(dom: Any, timeout: float) -> None:
    """Shut the domain down, or destroy it after ``timeout`` seconds."""
    try:
        dom.shutdown()
    except HypervisorError as e:
        log.info("shutdown of %s refused (%s); destroying it", dom.name(), e)
    deadline = time.monotonic() + timeout
    while _running(dom) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _running(dom):
        log.info("%s did not shut down within %g s; destroying it", dom.name(), timeout)
        try:
            dom.destroy()
        except HypervisorError as e:
            if _running(dom):
                raise MoveError(f"cannot stop {dom.name()}: {e}") from e


def _boot_back(conn: Any, xml: str, persistent: bool, name: str, rescue_dir: str, cause: Exception) -> None:
    try:
        if persistent and _defined(conn, name):
            conn.lookupByName(name).create()
        else:
            _boot(conn, xml, persistent)
    except HypervisorError as e:
        os.makedirs(rescue_dir, exist_ok=True)
        path = os.path.join(rescue_dir, f"{name}.rescue.xml")
        with open(path, "w") as f:
            f.write(xml)
        raise MoveError(f"cold move of {name} failed ({cause}) and it could not be booted again here ({e}): "
                        f"it is stopped; its definition is in {path} ('virsh define {path}')") from e


def _defined(conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except HypervisorError:
        return False


def _boot(conn: Any, xml: str, persistent: bool) -> None:
    if not persistent:
        conn.createXML(xml, 0)
        return
    dom = conn.defineXML(xml)
    try:
        dom.create()
    except HypervisorError:
        dom.undefine()
        raise
