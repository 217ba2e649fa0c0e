"""Checkpoints: libvirt's record of where each backup started, and the dirty extents since one.

Each view creates one checkpoint (one persistent QEMU dirty bitmap per qcow2 disk), named
``hyperback-<time>-<random>``; a later view reads what changed since it as NBD block status of
the context ``qemu:dirty-bitmap:backup-<disk>`` of a pull-mode backup job. The agent keeps only
the checkpoints a future incremental or differential can start from (:func:`prune_checkpoints`).
See docs/changed-block-tracking.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.agent.checkpoint_record import (
    CheckpointRecords,
    bitmaps_gone,
    drop_lost,
    remove_bitmaps_offline,
)
from host_agent.agent.domainxml import is_active
from host_agent.errors import HypervisorError, ImageError, NoCheckpoint, ViewError
from host_agent.storage import qcow2
from host_agent.storage.extents import Extent

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "hyperback-"
NBDINFO = "nbdinfo"
TOOL_TIMEOUT = 120.0


def new_checkpoint_name() -> str:
    return f"{CHECKPOINT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(3).hex()}"


def wait_no_backup_job(dom: Any, deadline: float) -> None:
    """Wait until the domain's backup job has ended (it ends asynchronously after abortJob)."""
    dom = hypervisor.guard(dom)
    while time.monotonic() < deadline:
        try:
            dom.backupGetXMLDesc(0)
        except HypervisorError:
            try:
                if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                    return
            except HypervisorError:
                return  # the domain is gone: so is its job
        time.sleep(0.02)
    raise ViewError(f"the backup job of {dom.name()} did not end within the timeout")


def read_dirty_extents(socket_path: str, export: str, context: str,
                       timeout: float = TOOL_TIMEOUT) -> list[Extent]:
    """The dirty extents of an NBD export's ``qemu:dirty-bitmap:...`` metadata context.

    Uses ``nbdinfo --map`` (Debian: libnbd-bin); without it, ``qemu-img map`` with QEMU's
    ``x-dirty-bitmap`` option (there, dirty ranges show as ``"data": false``).
    """
    if shutil.which(NBDINFO):


        uri = f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket_path, safe='/')}"
        cmd = [NBDINFO, "--json", f"--map={context}", uri]
        doc = _run_json(cmd, timeout, f"read {context} of {export}")
        return _merge((int(e["offset"]), int(e["length"])) for e in doc if int(e["type"]) & 1)
    opts = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in (
        ("driver", "nbd"), ("server.type", "unix"), ("server.path", socket_path), ("export", export),
        ("x-dirty-bitmap", context)))
    doc = _run_json([qcow2.QEMU_IMG, "map", "--output=json", "--image-opts", opts], timeout,
                    f"read {context} of {export}")
    return _merge((int(e["start"]), int(e["length"])) for e in doc if not e["data"])


def _run_json(cmd: Sequence[str], timeout: float, what: str) -> Any:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise ViewError(f"cannot {what}: {cmd[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise ViewError(f"cannot {what}: {cmd[0]} took more than {timeout:.0f} s") from e
    if out.returncode != 0:
        raise ViewError(f"cannot {what}: {out.stderr.strip() or f'{cmd[0]} exit status {out.returncode}'}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise ViewError(f"cannot {what}: {cmd[0]} printed no JSON") from e


def _merge(extents: Iterator[Extent] | Sequence[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for off, length in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], off + length - out[-1][0]))
        elif length:
            out.append((off, length))
    return out


def list_checkpoints(domain: Any) -> list[str]:
    """The hyperback checkpoints of a domain, oldest first.

    Ordered by the checkpoint chain (each checkpoint's parent is the one current when it was
    made), not by creationTime: that has one-second resolution, and two views in one second
    would otherwise come back in the order of their random name suffixes.
    """
    domain = hypervisor.guard(domain)
    try:
        cps = domain.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    except HypervisorError as e:
        raise ViewError(f"cannot list the checkpoints of {domain.name()}: {e}") from e
    return [name for name in (c.getName() for c in cps) if name.startswith(CHECKPOINT_PREFIX)]


def checkpoint_disks(domain: Any, name: str) -> set[str] | None:
    """The disks a checkpoint tracks with a bitmap; None if there is no such checkpoint."""
    domain = hypervisor.guard(domain)
    try:
        xml = domain.checkpointLookupByName(name).getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    except HypervisorError as e:
        if isinstance(e, NoCheckpoint):




            return None
        raise
    return {d.get("name", "") for d in ET.fromstring(xml).findall("./disks/disk")
            if d.get("checkpoint") == "bitmap"}


def delete_checkpoint(domain: Any, name: str) -> None:
    """Delete one checkpoint and its bitmaps. While the domain is shut off libvirt deletes only the
    metadata, so the bitmaps are removed from the images first (checkpoint_record.remove_bitmaps_offline);
    if that fails (the domain started), the checkpoint stays, for the next prune."""
    domain = hypervisor.guard(domain)
    try:
        cp = domain.checkpointLookupByName(name)
        if is_active(domain):
            _delete_running(domain, cp)
        else:
            remove_bitmaps_offline(domain, cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except HypervisorError as e:
        if isinstance(e, NoCheckpoint):
            return
        raise ViewError(f"cannot delete checkpoint {name} of {domain.name()}: {e}") from e
    except ImageError as e:
        raise ViewError(f"cannot delete checkpoint {name} of the shut-off {domain.name()}: {e}") from e
    log.info("deleted checkpoint %s of %s", name, domain.name())


def _delete_running(domain: Any, cp: Any) -> None:
    """Delete a running domain's checkpoint with its bitmaps. libvirt refuses one whose bitmap is
    gone from the disk ("bitmap ... not found in backing chain": the image was replaced or restored
    under the domain); with nothing left to remove, its metadata goes alone."""
    try:
        cp.delete(0)
    except HypervisorError:
        xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        if not bitmaps_gone(domain, xml):
            raise
        log.info("checkpoint %s of %s has no bitmap left: deleting its metadata", cp.getName(), domain.name())
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def prune_checkpoints(domain: Any, keep: Sequence[str] | set[str],
                      records: CheckpointRecords | None = None) -> list[str]:
    """Delete the hyperback checkpoints not in ``keep`` (each one costs a bitmap QEMU updates on
    every write). Keep the checkpoints of the latest snapshot and of the latest full snapshot of
    every disk of the domain. Returns the names deleted. With ``records``, their records go too,
    and so do the bitmaps of recorded checkpoints libvirt lost (checkpoint_record.drop_lost)."""
    domain = hypervisor.guard(domain)
    gone = []
    defined = list_checkpoints(domain)
    for name in defined:


        if name not in keep:
            delete_checkpoint(domain, name)
            gone.append(name)
    if records is not None:
        records.drop(domain, set(gone))
        gone += drop_lost(domain, records, set(keep), set(defined))
    return gone
