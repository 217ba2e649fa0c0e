"""Dirty bitmaps that live only as long as the QEMU process: changed-block tracking for raw disks.

A raw image (a file, an LVM volume, a loop device) cannot store a persistent bitmap, so libvirt
refuses a checkpoint on it. QEMU can still keep a *non-persistent* dirty bitmap on the disk's node
while it runs. A view adds one, named like the view's checkpoint, before its snapshot (the order of
docs/changed-block-tracking.md: a write in between is read twice, never lost); the next view reads
what it marks as NBD block status, and falls back to comparison, saying why, when it is gone: the
domain was restarted, migrated or moved since (the bitmap went with its QEMU process).

libvirt has no API for such bitmaps, so they are made through QEMU's monitor
(``virDomainQemuMonitorCommand``; libvirt marks the domain "custom-monitor" tainted in its log):

* ``block-dirty-bitmap-add`` (``persistent: false``) on the disk's top node before the snapshot;
  the external snapshot puts an overlay above that node, whose writes the commit at the view's
  end writes into the node: its bitmaps record them, as QEMU's block layer marks every write.
* reading bitmap X: a disabled copy (``transaction``: add + ``block-dirty-bitmap-merge``; QEMU
  exports no enabled bitmap read-only, and X must go on recording in case this backup fails),
  exported with the node by QEMU's own NBD server on a unix socket (``nbd-server-start``,
  ``block-export-add`` with ``bitmaps``), read with ``nbdinfo --map``, then the server stopped
  and the copy removed.
* :func:`prune` removes the ``hyperback-`` bitmaps no chain needs, like checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection
from typing import Any

from host_agent import hypervisor
from host_agent.agent.checkpoints import CHECKPOINT_PREFIX, read_dirty_extents
from host_agent.errors import HypervisorError, ViewError
from host_agent.model import Fallback, FallbackNote
from host_agent.storage.extents import Extent

log = logging.getLogger(__name__)

EXPORT = "hb-bitmap"


def qmp(dom: Any, command: str, **arguments: Any) -> Any:
    """One QEMU monitor command; its ``return`` value. ViewError if QEMU or libvirt refuses."""
    msg = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    try:
        reply = json.loads(hypervisor.qemu_monitor(dom, msg))
    except HypervisorError as e:
        raise ViewError(f"QEMU monitor command {command} failed: {e}") from e
    if "error" in reply:
        raise ViewError(f"QEMU refused {command}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


def top_node(dom: Any, target: str) -> str:
    """The node name of the block node disk ``target`` (vda) writes into now."""
    dom = hypervisor.guard(dom)
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except HypervisorError as e:
        raise ViewError(f"cannot read the domain XML of {dom.name()}: {e}") from e
    alias = next((d.find("alias") for d in root.findall("./devices/disk")
                  if d.find(f"target[@dev='{target}']") is not None), None)
    if alias is None or not alias.get("name"):
        raise ViewError(f"{dom.name()} {target} has no device alias in its live XML")
    for device in qmp(dom, "query-block"):
        qdev = str(device.get("qdev", ""))
        if qdev.split("/")[-2:-1] == [alias.get("name")] or qdev == alias.get("name"):
            node = device.get("inserted", {}).get("node-name")
            if node:
                return str(node)
    raise ViewError(f"QEMU shows no block node for {dom.name()} {target} (alias {alias.get('name')})")


def _bitmaps(dom: Any) -> dict[str, list[dict[str, Any]]]:
    """Every node's dirty bitmaps, by node name."""
    return {str(n["node-name"]): list(n.get("dirty-bitmaps", []))
            for n in qmp(dom, "query-named-block-nodes", flat=True) if n.get("node-name")}


def add(dom: Any, node: str, name: str) -> None:
    qmp(dom, "block-dirty-bitmap-add", node=node, name=name, persistent=False)


def present(dom: Any, node: str, name: str) -> bool:
    """Bitmap ``name`` is on ``node`` and recording (it is gone after a restart, a migration, a move)."""
    for bitmap in _bitmaps(dom).get(node, []):
        if bitmap.get("name") == name:
            return bool(bitmap.get("recording", True)) and not bitmap.get("inconsistent", False)
    return False


def remove(dom: Any, node: str, name: str) -> None:
    qmp(dom, "block-dirty-bitmap-remove", node=node, name=name)


def read(dom: Any, node: str, name: str, socket_dir: str, timeout: float) -> list[Extent]:
    """The extents bitmap ``name`` of ``node`` marks dirty (the node must be read-only by now: a
    view's snapshot put an overlay above it)."""
    if any(e.get("id") == EXPORT for e in qmp(dom, "query-block-exports")):
        qmp(dom, "nbd-server-stop")  # left by an agent that died while reading: ours, not libvirt's
    copy = f"{name}.read-{os.urandom(3).hex()}"  # a leftover one is pruned: not in any chain
    qmp(dom, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": copy, "persistent": False,
                                                     "disabled": True}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": copy, "bitmaps": [name]}}])
    workdir = tempfile.mkdtemp(prefix="hb-view-", dir=socket_dir)
    sock = os.path.join(workdir, "nbd.sock")
    try:
        qmp(dom, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})  # SocketAddressLegacy
        try:
            qmp(dom, "block-export-add", type="nbd", id=EXPORT, **{"node-name": node}, name=EXPORT,
                writable=False, bitmaps=[copy])
            return read_dirty_extents(sock, EXPORT, f"qemu:dirty-bitmap:{copy}", timeout)
        finally:
            qmp(dom, "nbd-server-stop")  # ends the export with it
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _remove_when_free(dom, node, copy, time.monotonic() + timeout)


def _remove_when_free(dom: Any, node: str, name: str, deadline: float) -> None:
    """Remove a bitmap an export just released (QEMU drops the export asynchronously)."""
    while True:
        try:
            remove(dom, node, name)
            return
        except ViewError as e:
            if time.monotonic() > deadline:
                log.warning("could not remove the temporary bitmap %s: %s", name, e)
                return
            time.sleep(0.02)


def prune(dom: Any, keep: Collection[str]) -> list[str]:
    """Remove the non-persistent ``hyperback-`` bitmaps not in ``keep``; the names removed."""
    gone = []
    for node, bitmaps in _bitmaps(dom).items():
        for bitmap in bitmaps:
            name = str(bitmap.get("name", ""))
            if name.startswith(CHECKPOINT_PREFIX) and not bitmap.get("persistent") and name not in keep:
                remove(dom, node, name)
                gone.append(name)
    return gone


def changes_since(dom: Any, node: str, since: str, socket_dir: str,
                  timeout: float) -> tuple[list[Extent] | None, str]:
    """The extents written to ``node`` since bitmap ``since`` was added, or None and why not."""
    try:
        if not present(dom, node, since):
            return None, FallbackNote(Fallback.BITMAP_MISSING, (
                f"the dirty bitmap {since} is gone: a raw disk's bitmap lives only in its QEMU process, "
                "which was restarted (or the domain moved) since the base snapshot"))
        return read(dom, node, since, socket_dir, timeout), ""
    except ViewError as e:
        return None, f"could not read the dirty bitmap {since}: {e}"
