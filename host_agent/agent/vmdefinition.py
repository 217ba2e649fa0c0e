"""A domain's definition, stored with every backup of its disks (docs/repository-format.md, 5.3).

Before the first disk of a domain is backed up in a plan, the agent reads the domain's persistent
XML (inactive: what ``virsh define`` would be given; secrets stripped), its NVRAM file
(``<os><nvram>``) and its swtpm state files, and stores each as a snapshot of its own named
``UUID/vm/ITEM``. Each disk snapshot of that run then names them in its ``vm`` field, so that a
reader finds the VM as it was at any disk snapshot. Small files, stored whole each time: their
chunks deduplicate against the previous run's.
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent.destinations import AnyRepository
from host_agent.model import Policy
from host_agent.storage.cancel import CancelToken
from host_agent.storage.snapshot import Snapshot, VmFile, VmRef, vm_snapshot_name

log = logging.getLogger(__name__)

SWTPM_STATE = Path("/var/lib/libvirt/swtpm")  # libvirt keeps an emulated TPM's state in UUID/ below
MAX_DEFINITION = 16 * 1024 * 1024            # a domain's XML is kilobytes; more is not one
MAX_TPM_FILES = 16                            # swtpm writes one or two; more is not a TPM state dir
SECRET_ATTRIBUTES = ("passwd",)               # <graphics passwd=...>: what the SECURE flag adds


@dataclass(frozen=True)
class Definition:
    """What a domain is besides its disks, read from libvirt and the host's files."""

    uuid: str
    name: str
    xml: str                                  # persistent definition, secrets stripped
    nvram: str | None                         # absolute path of the NVRAM file, if it has one
    tpm_dir: Path | None                      # its swtpm state directory, if it has an emulated TPM


def strip_secrets(xml: str) -> str:
    """The XML without the secrets libvirt includes with VIR_DOMAIN_XML_SECURE (graphics passwords):
    a backup repository is no place for them (docs/repository-format.md, section 10)."""
    root = ET.fromstring(xml)
    for element in root.iter():
        for attribute in SECRET_ATTRIBUTES:
            element.attrib.pop(attribute, None)
    return ET.tostring(root, encoding="unicode")


def persistent_xml(dom: Any) -> str:
    """The inactive definition; with secure information where libvirt grants it (read-only
    connections are refused it), which is then stripped of secrets."""
    dom = hypervisor.guard(dom)
    try:
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    except errors.HypervisorError as e:
        log.info("no secure XML of %s (%s); taking the plain one", dom.name(), e)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return strip_secrets(xml)


def capture(dom: Any) -> Definition:
    """Read a domain's definition; its files are read when stored."""
    dom = hypervisor.guard(dom)
    uuid = dom.UUIDString()
    xml = persistent_xml(dom)
    root = ET.fromstring(xml)
    nvram = (root.findtext("./os/nvram") or "").strip() or None
    emulated = root.find("./devices/tpm/backend[@type='emulator']") is not None
    tpm_dir = SWTPM_STATE / uuid if emulated and (SWTPM_STATE / uuid).is_dir() else None
    return Definition(uuid, dom.name(), xml, nvram, tpm_dir)


def tpm_files(state_dir: Path) -> Iterator[Path]:
    """The regular files under a swtpm state directory (symbolic links are not followed)."""
    found = 0
    for dirpath, _dirs, files in os.walk(state_dir):
        for name in sorted(files):
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found += 1
                if found > MAX_TPM_FILES:
                    raise errors.SourceError(f"{state_dir} holds more than {MAX_TPM_FILES} files: "
                                             "not storing it as a TPM state")
                yield path


def store(repo: AnyRepository, definition: Definition, jobs: Sequence[str], work_dir: Path,
          cancel: CancelToken | None = None) -> VmRef:
    """Store the definition's XML and files as snapshots of their own; the reference the run's disk
    snapshots carry.  ``cancel`` (the run's job's) stops it before anything more is published."""
    uuid = definition.uuid
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=work_dir, prefix=f"{uuid}-", suffix=".xml") as tmp:
        tmp.write(definition.xml.encode())
        tmp.flush()
        xml_snap = repo.backup(tmp.name, vm_snapshot_name(uuid, "definition"), Policy.FULL,
                               cancel=cancel).snapshot
    files: list[VmFile] = []
    # a UEFI domain that never started has no NVRAM file yet: libvirt makes it from its template
    if definition.nvram is not None and Path(definition.nvram).is_file():
        files.append(_store_file(repo, uuid, "nvram", Path(definition.nvram), definition.nvram, cancel))
    if definition.tpm_dir is not None:
        for i, path in enumerate(tpm_files(definition.tpm_dir)):
            files.append(_store_file(repo, uuid, f"tpm-{i}", path, str(path.relative_to(definition.tpm_dir)),
                                     cancel, role="tpm"))
    return VmRef(os.urandom(8).hex(), tuple(jobs), uuid, definition.name, xml_snap.id, tuple(files))


def _store_file(repo: AnyRepository, uuid: str, item: str, path: Path, recorded: str,
                cancel: CancelToken | None, role: str = "nvram") -> VmFile:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise errors.SourceError(f"cannot read {role} file {path}: {e.strerror}") from e
    snap = repo.backup(path, vm_snapshot_name(uuid, item), Policy.FULL, cancel=cancel).snapshot
    return VmFile(role, recorded, snap.id, mode)


def read_stored(repo: AnyRepository, vm: VmRef) -> str:
    """The stored XML of a run's domain, every chunk verified (restore-vm, verify-boot)."""
    snap = repo.resolve(vm.definition)
    if snap.size > MAX_DEFINITION:
        raise errors.RepositoryError(f"snapshot {snap.id} holds {snap.size} bytes: not a domain definition")
    with tempfile.TemporaryDirectory(prefix="hyperback-definition-") as tmp:
        target = Path(tmp) / "domain.xml"
        repo.restore(snap.id, target, overwrite=True, sync=False)
        return target.read_text()


def stored_for(repo: AnyRepository, snapshot: Snapshot) -> tuple[str, str] | None:
    """The definition stored with a disk snapshot's run, and its snapshot's id; None when the
    snapshot carries none (taken before definitions were stored, or not by the agent)."""
    if snapshot.vm is None:
        return None
    return read_stored(repo, snapshot.vm), snapshot.vm.definition
