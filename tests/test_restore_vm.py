"""Whole-VM restore without a VM: the stored definition's format, its rewriting for a new domain,
and restores as a new domain or in place against libvirt's own test driver (test:///default)."""
from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import MIB, sha256_file, write_image

from host_agent import errors, hypervisor
from host_agent.agent import vmdefinition
from host_agent.model import Policy
from host_agent.restore import vm as restore_vm
from host_agent.restore import vmxml
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot, VmRef

DOMAIN = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
<nvram>{nvram}</nvram></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/><serial>data-1</serial></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{scratch}'/>
<target dev='vdb' bus='virtio'/><serial>scratch</serial></disk>
<disk type='file' device='cdrom'><source file='/srv/iso/installer.iso'/><target dev='hdc' bus='ide'/>
<readonly/></disk>
<interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/>
<target dev='vnet-orig'/></interface>
<channel type='unix'><source mode='bind' path='/run/orig/hb.sock'/>
<target type='virtio' name='org.hyperback.agent.0'/></channel>
<serial type='file'><source path='/var/log/orig-console.log'/><target port='0'/></serial>
<console type='file'><source path='/var/log/orig-console.log'/><target type='serial' port='0'/></console>
<graphics type='vnc' passwd='sekret'/>
</devices></domain>"""


@pytest.fixture
def conn() -> Iterator[hypervisor.Guarded]:
    c = hypervisor.connect("test:///default")  # a private, empty-but-one-domain hypervisor per connection
    yield c
    c.close()


@pytest.fixture
def backed_up(conn: hypervisor.Guarded, tmp_path: Path) -> tuple[Repository, hypervisor.Guarded, Path, Path]:
    """A shut-off domain with a data disk and an NVRAM file, backed up as the agent does: the
    definition first, then the data disk (vdb, scratch, is not backed up)."""
    disk = write_image(tmp_path / "orig-vda.img", 2 * MIB, 5)
    nvram = tmp_path / "orig_VARS.fd"
    nvram.write_bytes(b"NVRAM" * 1000)
    nvram.chmod(0o640)
    dom = conn.defineXML(DOMAIN.format(name="orig", disk=disk, scratch=tmp_path / "scratch.img",
                                       nvram=nvram))
    repo = Repository.init(tmp_path / "repo")
    ref = vmdefinition.store(repo, vmdefinition.capture(dom), ["job-one"], tmp_path / "work")
    repo.backup(disk, f"{dom.UUIDString()}/data-1", Policy.FULL, vm=ref)
    return repo, dom, disk, nvram


def test_the_stored_definition_is_inactive_xml_without_secrets_and_its_files_are_snapshots(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path]) -> None:
    repo, dom, _disk, nvram = backed_up
    run = restore_vm.find_run(repo, "job-one")
    assert run.vm.domain_uuid == dom.UUIDString() and run.vm.domain_name == "orig"
    assert [s.name for s in run.disks] == [f"{dom.UUIDString()}/data-1"]
    xml = vmdefinition.read_stored(repo, run.vm)
    assert "sekret" not in xml and "passwd" not in xml
    assert ET.fromstring(xml).findtext("name") == "orig"
    (stored,) = run.vm.files
    assert (stored.role, stored.path, stored.mode) == ("nvram", str(nvram), 0o640)
    assert repo.resolve(stored.snapshot).name == f"{dom.UUIDString()}/vm/nvram"
    assert repo.resolve(run.vm.definition).name == f"{dom.UUIDString()}/vm/definition"
    # the same run whichever of its snapshots names it
    assert restore_vm.find_run(repo, run.disks[0].id).vm == run.vm
    assert restore_vm.find_run(repo, run.vm.definition).vm == run.vm


def test_a_snapshot_document_carries_the_vm_field_and_old_documents_read_without_it(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path]) -> None:
    repo, _dom, _disk, _nvram = backed_up
    snap = restore_vm.find_run(repo, "job-one").disks[0]
    doc = json.loads((repo.path / "snapshots" / snap.id).read_text())
    assert doc["vm"]["definition"] and doc["vm"]["jobs"] == ["job-one"] and len(doc["vm"]["run"]) == 16
    assert Snapshot.from_json(doc) == snap
    old = {k: v for k, v in doc.items() if k != "vm"}
    assert Snapshot.from_json(old).vm is None
    assert VmRef.from_json(doc["vm"]) == snap.vm


def test_a_new_domain_gets_a_new_name_uuid_macs_disks_nvram_and_files_of_its_own(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path], tmp_path: Path) -> None:
    repo, dom, disk, nvram = backed_up
    run = restore_vm.find_run(repo, "job-one")
    conn = dom.connect()
    out = tmp_path / "restored"
    result = restore_vm.restore_as(conn, repo, run, "copy", out, "qcow2")
    new = conn.lookupByName("copy")
    assert new.UUIDString() == result.uuid != dom.UUIDString()
    root = ET.fromstring(new.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    macs = [m.get("address") for m in root.findall("./devices/interface/mac")]
    assert macs and "52:54:00:11:22:33" not in macs
    assert root.find("./devices/interface/target") is None or \
        root.find("./devices/interface/target").get("dev") != "vnet-orig"  # type: ignore[union-attr]
    disks = {d.dev: d for d in vmxml.disks(root)}
    assert set(disks) == {"vda", "hdc"}  # vdb (writable, not backed up) is left out, the CD-ROM stays
    assert result.dropped == ("vdb",)
    assert disks["vda"].source == str(out / "copy-vda.qcow2") and disks["vda"].format == "qcow2"
    raw = tmp_path / "check.raw"
    from host_agent.storage import qcow2
    qcow2.convert_to_raw(out / "copy-vda.qcow2", raw, "qcow2")
    assert sha256_file(raw) == sha256_file(disk)
    assert root.findtext("./os/nvram") == str(out / "copy_VARS.fd")
    assert (out / "copy_VARS.fd").read_bytes() == nvram.read_bytes()
    assert (out / "copy_VARS.fd").stat().st_mode & 0o777 == 0o640
    console = {s.get("path") for s in root.findall("./devices/*/source") if s.get("path")}
    assert "/var/log/orig-console.log" not in console and "/run/orig/hb.sock" not in console
    # the original is untouched
    assert ET.fromstring(dom.XMLDesc(0)).findtext("./os/nvram") == str(nvram)


def test_a_taken_name_is_refused_and_a_failed_restore_leaves_nothing(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path], tmp_path: Path) -> None:
    repo, dom, _disk, _nvram = backed_up
    run = restore_vm.find_run(repo, "job-one")
    conn = dom.connect()
    with pytest.raises(errors.UsageError, match="exists"):
        restore_vm.restore_as(conn, repo, run, "orig", tmp_path / "x")

    def broken(*_args: object) -> None:
        raise errors.TargetError("disk full")

    out = tmp_path / "y"
    with pytest.raises(errors.TargetError, match="disk full"):
        restore_vm.restore_as(conn, repo, run, "copy2", out, materialize=broken)
    with pytest.raises(errors.NoDomain):
        conn.lookupByName("copy2")
    assert not any(out.iterdir())


def test_in_place_replaces_the_disks_and_nvram_and_keeps_the_domain(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path]) -> None:
    repo, dom, disk, nvram = backed_up
    before = sha256_file(disk)
    xml_before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    write_image(disk, 2 * MIB, 99)       # written after the backup
    nvram.write_bytes(b"changed")
    run = restore_vm.find_run(repo, "job-one")
    result = restore_vm.restore_in_place(dom.connect(), repo, run)
    assert sha256_file(disk) == before and nvram.read_bytes() == b"NVRAM" * 1000
    assert result.uuid == dom.UUIDString() and dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml_before
    assert not list(disk.parent.glob(".*hyperback*"))


def test_in_place_refuses_a_running_domain_without_stop_and_stops_it_with_stop(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path]) -> None:
    repo, dom, _disk, _nvram = backed_up
    dom.create()
    with pytest.raises(errors.UsageError, match="--stop"):
        restore_vm.restore_in_place(dom.connect(), repo, restore_vm.find_run(repo, "job-one"))
    # with --stop it is shut down first (the test driver's guest obeys at once), then restored and started
    result = restore_vm.restore_in_place(dom.connect(), repo, restore_vm.find_run(repo, "job-one"),
                                         stop=True, start=True)
    assert result.started and dom.isActive()


def test_a_snapshot_without_a_definition_says_how_to_restore_it(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    snap = repo.backup(write_image(tmp_path / "d.img", MIB, 1), "vm1/vda").snapshot
    with pytest.raises(errors.UsageError, match="hyperback restore"):
        restore_vm.find_run(repo, snap.id)
    with pytest.raises(errors.SnapshotNotFound, match="job"):
        restore_vm.find_run(repo, "nope-nope")


def test_secrets_are_stripped_and_rewriting_keeps_what_it_does_not_know() -> None:
    assert "passwd" not in vmdefinition.strip_secrets("<domain><devices><graphics type='vnc' passwd='x'/>"
                                                      "</devices></domain>")
    xml = ("<domain><name>a</name><uuid>u</uuid><metadata><x:y xmlns:x='urn:x'>keep</x:y></metadata>"
           "<devices><disk type='block' device='disk'><source dev='/dev/vg/a'/><backingStore/>"
           "<target dev='vda'/><serial>s</serial></disk></devices></domain>")
    out = vmxml.as_new_domain(xml, "b", {"vda": vmxml.DiskTarget(Path("/r/b-vda.img"), "raw")}, Path("/r"))
    root = ET.fromstring(out.xml)
    assert root.findtext("name") == "b" and root.findtext("uuid") == out.uuid != "u"
    disk = root.find("./devices/disk")
    assert disk is not None and disk.get("type") == "file" and disk.find("backingStore") is None
    assert vmxml.disks(root)[0].source == "/r/b-vda.img" and vmxml.disks(root)[0].format == "raw"
    assert "keep" in out.xml
    with pytest.raises(errors.RepositoryError, match="not a <domain>"):
        vmxml.parse("<network/>")


def test_the_definition_goes_through_a_media_service_and_a_vm_restores_from_there(
        conn: hypervisor.Guarded, tmp_path: Path) -> None:
    from host_agent.media import server as media
    from host_agent.media.client import RemoteRepository

    disk = write_image(tmp_path / "orig-vda.img", 2 * MIB, 6)
    nvram = tmp_path / "orig_VARS.fd"
    nvram.write_bytes(b"remote NVRAM")
    dom = conn.defineXML(DOMAIN.format(name="orig", disk=disk, scratch=tmp_path / "s.img", nvram=nvram))
    local = Repository.init(tmp_path / "repo")
    srv = media.start({"main": local.path}, "127.0.0.1:0", "hostb", lease=5.0)
    try:
        with RemoteRepository(srv.address, "main", timeout=10, spool_dir=tmp_path) as remote:
            ref = vmdefinition.store(remote, vmdefinition.capture(dom), ["job-remote"], tmp_path / "work")
            remote.backup(disk, f"{dom.UUIDString()}/data-1", Policy.FULL, vm=ref)
            run = restore_vm.find_run(remote, "job-remote")
            result = restore_vm.restore_as(conn, remote, run, "from-afar", tmp_path / "out")
    finally:
        srv.stop(grace=0)
    assert sha256_file(Path(result.disks[0]["path"])) == sha256_file(disk)
    assert (tmp_path / "out" / "from-afar_VARS.fd").read_bytes() == b"remote NVRAM"
    # what the service committed is what a local reader finds
    assert restore_vm.find_run(local, "job-remote").vm == run.vm


def test_a_disk_snapshot_cannot_name_a_definition_the_repository_lacks(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    ref = VmRef("0" * 16, ("job",), "u", "web", "ffffffffffffffff")
    with pytest.raises(errors.UsageError, match="lacks"):
        repo.backup(write_image(tmp_path / "d.img", MIB, 1), "u/root", vm=ref)
    assert repo.snapshots() == []


def test_a_domain_whose_nvram_file_does_not_exist_yet_is_stored_without_it(
        conn: hypervisor.Guarded, tmp_path: Path) -> None:
    disk = write_image(tmp_path / "d.img", MIB, 2)
    dom = conn.defineXML(DOMAIN.format(name="fresh", disk=disk, scratch=tmp_path / "s.img",
                                       nvram=tmp_path / "never_VARS.fd"))
    repo = Repository.init(tmp_path / "repo")
    ref = vmdefinition.store(repo, vmdefinition.capture(dom), ["j"], tmp_path / "work")
    assert ref.files == ()
    repo.backup(disk, f"{dom.UUIDString()}/data-1", vm=ref)
    result = restore_vm.restore_as(conn, repo, restore_vm.find_run(repo, "j"), "fresh2", tmp_path / "out")
    assert result.files == []


def test_the_media_service_refuses_a_disk_snapshot_naming_a_definition_it_lacks(tmp_path: Path) -> None:
    from host_agent.media import server as media
    from host_agent.media.client import RemoteRepository

    local = Repository.init(tmp_path / "repo")
    srv = media.start({"main": local.path}, "127.0.0.1:0", "hostb", lease=5.0)
    try:
        with RemoteRepository(srv.address, "main", timeout=10, spool_dir=tmp_path) as remote:
            ref = VmRef("0" * 16, ("job",), "u", "web", "ffffffffffffffff")
            with pytest.raises(errors.HyperbackError, match="lacks"):
                remote.backup(write_image(tmp_path / "d.img", MIB, 1), "u/root", vm=ref)
    finally:
        srv.stop(grace=0)
    assert local.snapshots() == []


def test_instantly_a_one_disk_run_runs_as_a_new_domain_on_an_overlay_of_its_snapshot(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path], tmp_path: Path) -> None:
    """The test driver starts the domain but has no block copy: the recovery stops at FAILED with
    the domain on the overlay, which is as far as it goes without QEMU (tests/test_instant_vm.py)."""
    repo, dom, _disk, nvram = backed_up
    run = restore_vm.find_run(repo, "job-one")
    conn = dom.connect()
    out = tmp_path / "instant"
    recovery, result = restore_vm.restore_instant(conn, repo, run, "quick", out, tmp_path / "run")
    try:
        new = conn.lookupByName("quick")
        assert new.isActive() and new.isPersistent() and new.UUIDString() == result.uuid != dom.UUIDString()
        root = ET.fromstring(new.XMLDesc(0))
        (vda,) = [d for d in root.iterfind("./devices/disk") if d.find("target").get("dev") == "vda"]  # type: ignore[union-attr]
        assert vda.find("source").get("file") == str(recovery.overlay)  # type: ignore[union-attr]
        assert vda.find("backingStore/source").get("protocol") == "nbd"  # type: ignore[union-attr]
        assert root.findtext("./os/nvram") == str(out / "quick_VARS.fd")
        assert (out / "quick_VARS.fd").read_bytes() == nvram.read_bytes()
        assert result.started and result.disks == [{"dev": "vda", "path": str(out / "quick-vda.img"),
                                                    "format": "raw", "snapshot": run.disks[0].id}]
        assert recovery.phase.value == "failed" and "virDomainBlockCopy" in recovery.detail
        assert not (out / "quick-vda.img").exists()
    finally:
        with contextlib.suppress(errors.HypervisorError):
            conn.lookupByName("quick").destroy()
        recovery.close()
    assert not recovery.overlay.exists() and not (tmp_path / "run" / "export.sock").exists()  # type: ignore[union-attr]


def test_instantly_refuses_a_run_of_several_disks_and_a_taken_name_before_anything_runs(
        backed_up: tuple[Repository, hypervisor.Guarded, Path, Path], tmp_path: Path) -> None:
    repo, dom, _disk, _nvram = backed_up
    conn = dom.connect()
    run = restore_vm.find_run(repo, "job-one")
    with pytest.raises(errors.UsageError, match="exists"):
        restore_vm.restore_instant(conn, repo, run, "test", tmp_path / "o", tmp_path / "run")
    scratch = write_image(tmp_path / "scratch.img", MIB, 6)
    repo.backup(scratch, f"{dom.UUIDString()}/scratch", Policy.FULL, vm=run.vm)
    two = restore_vm.find_run(repo, "job-one")
    with pytest.raises(errors.UsageError, match="one disk; .* backed up 2 .*without --instant"):
        restore_vm.restore_instant(conn, repo, two, "quick", tmp_path / "o", tmp_path / "run")
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()
    with pytest.raises(errors.NoDomain):
        conn.lookupByName("quick")
