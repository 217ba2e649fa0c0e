"""What moving a domain to another host would cost, measured on the host it runs on, for the
optimizer's ``colocate`` policy: its touched memory (sampled from QEMU's guest RAM), its dirty
rate (measured by QEMU), whether it can move at all (every file it writes on shared storage, no
host devices), and how much data each disk holds.

Why sample memory instead of reading QEMU's RSS: a live migration sends non-zero pages only, and a
guest keeps many zeroed pages resident; RSS overstated the stream by 20-25 % in the lab, a 4096-page
sample of the guest RAM mapping is within a few percent (docs/colocation.md).
"""
from __future__ import annotations

import logging
import os
import random
import re
import stat
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.colocation import migration
from host_agent.errors import HypervisorError
from host_agent.inventory import Inventory
from host_agent.model import VmFootprint

log = logging.getLogger(__name__)

PAGE = 4096
SAMPLE_PAGES = 4096
_ZERO_PAGE = bytes(PAGE)


def qemu_pid(domain_uuid: str) -> int | None:
    """The QEMU process running ``domain_uuid`` on this host (its command line names the uuid)."""
    needle = f"-uuid\0{domain_uuid}\0".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    return int(entry.name)
        except OSError:
            continue
    return None


def _ram_mapping(pid: int, memory_bytes: int) -> tuple[int, int] | None:
    """(start, length) of QEMU's mapping of the guest RAM: the writable one of exactly its size."""
    pattern = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) rw")
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            m = pattern.match(line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                if end - start == memory_bytes:
                    return start, end - start
    return None


def touched_bytes(pid: int, memory_bytes: int, samples: int = SAMPLE_PAGES) -> int | None:
    """Estimated non-zero bytes of the guest's RAM: what a live migration sends (None: not found)."""
    found = _ram_mapping(pid, memory_bytes)
    if found is None:
        return None
    start, length = found
    pages = length // PAGE
    picks = range(pages) if pages <= samples else random.sample(range(pages), samples)
    nonzero = 0
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for page in picks:
            if os.pread(fd, PAGE, start + page * PAGE) != _ZERO_PAGE:
                nonzero += 1
    finally:
        os.close(fd)
    return round(length * nonzero / len(picks))


def domain_sources(domain_xml: str) -> list[str]:
    """Every file or device the domain writes or boots from: disk and cdrom sources with their
    backing chains, and the UEFI variable store.  All must be on shared storage for it to move."""
    root = ET.fromstring(domain_xml)
    paths = [src.get("file") or src.get("dev") or "" for src in root.iterfind("./devices/disk//source")]
    paths += [n.text or "" for n in root.iterfind("./os/nvram")]
    return [p for p in paths if p]


def dirty_rate(dom: Any, seconds: int = 1) -> float:
    """Bytes per second the guest dirties, as QEMU measures it (0.0 if it cannot)."""
    dom = hypervisor.guard(dom)
    try:
        dom.startDirtyRateCalc(seconds, 0)
        deadline = time.monotonic() + seconds + 5
        while time.monotonic() < deadline:
            time.sleep(0.25)
            stats = dom.connect().domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)
            values = stats[0][1] if stats else {}
            if values.get("dirtyrate.calc_status") == 2:  # measured
                return float(values.get("dirtyrate.megabytes_per_second", 0)) * 1024 * 1024
    except HypervisorError as e:
        log.info("no dirty rate for %s: %s", dom.name(), e)
    return 0.0


def footprint(dom: Any, inventory: Inventory, *, sample: bool = True) -> VmFootprint:
    """What moving ``dom`` to another host would cost, measured now.

    The touched memory is sampled from QEMU's guest RAM when ``sample`` (the domain runs on this
    host, so its QEMU process is here), else QEMU's RSS stands in: an overestimate, which errs
    towards leaving the domain where it is (for the lab's appliance it was 77-90 % over what its
    migrations sent, docs/colocation.md).
    """
    dom = hypervisor.guard(dom)
    uuid = dom.UUIDString()
    xml = dom.XMLDesc(0)
    memory = int(dom.info()[1]) * 1024  # the maximum: QEMU maps that much guest RAM, balloon or not
    live, why = migration.live_migratable(xml)
    local = [p for p in domain_sources(xml) if not inventory.shared(p)]
    movable = not local
    if local:
        why = f"disk {local[0]} is not on shared storage" + (f"; {why}" if why else "")
    touched = _sampled_touched_bytes(dom, uuid, memory) if sample else None
    if touched is None:
        rss = int(dom.memoryStats().get("rss", 0)) * 1024
        log.info("guest RAM of %s not sampled; using its RSS %d", dom.name(), rss)
        touched = min(rss, memory) or memory
    return VmFootprint(uuid, memory, touched, dirty_rate(dom), live, movable, why)


def _sampled_touched_bytes(dom: Any, uuid: str, memory: int) -> int | None:
    pid = qemu_pid(uuid)
    try:
        return touched_bytes(pid, memory) if pid is not None else None
    except OSError as e:  # e.g. ptrace access to QEMU's memory denied by a security module
        log.info("cannot sample the guest RAM of %s: %s", dom.name(), e)
        return None


def allocated_bytes(path: str) -> int:
    """Bytes of an image that hold data (a regular file's allocated blocks; a device's size)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return min(st.st_blocks * 512, st.st_size)
