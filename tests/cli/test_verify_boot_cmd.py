"""hyperback verify-boot's user mistakes (one line, exit 2, nothing booted), and its whole run on
libvirt's test driver, which boots nothing; real boots are tests/test_verify_boot_vm.py."""
from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image

from host_agent import hypervisor
from host_agent.agent import vmdefinition
from host_agent.model import Policy
from host_agent.storage.repository import Repository

UNKNOWN_UUID = "00000000-0000-4000-8000-00000000beef"


def backed_up(tmp_path: Path, name: str) -> tuple[Path, str]:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 2)
    snapshot: str = run_json("backup", "--repo", tmp_path / "r", "--name", name, image)["snapshot"]
    return tmp_path / "r", snapshot


def test_a_snapshot_that_is_not_of_a_vm_disk_cannot_be_booted(tmp_path: Path) -> None:
    repo, snapshot = backed_up(tmp_path, "plainfile")
    assert_one_line_error(run("verify-boot", "--repo", repo, snapshot, check=False), 2,
                          "is not of a VM's disk (DOMAIN/SERIAL)")


def test_a_domain_this_host_does_not_know_asks_for_its_definition(tmp_path: Path) -> None:
    repo, snapshot = backed_up(tmp_path, f"{UNKNOWN_UUID}/root")
    proc = run("verify-boot", "--repo", repo, "--libvirt", "test:///default", snapshot, check=False)
    assert_one_line_error(proc, 2, f"domain {UNKNOWN_UUID} is not defined on this host", "--domain-xml")
    proc = run("verify-boot", "--repo", repo, "--domain-xml", tmp_path / "none.xml", snapshot, check=False)
    assert_one_line_error(proc, 2, "cannot read --domain-xml")
    (tmp_path / "vm.xml").write_text("<domain><devices/></domain>")
    proc = run("verify-boot", "--repo", repo, "--domain-xml", tmp_path / "vm.xml", "--libvirt", "test:///default",
               "--work-dir", tmp_path / "work", snapshot, check=False)
    assert_one_line_error(proc, 2, "no disk with serial 'root'")
    assert not list((tmp_path / "work").iterdir())  # the run folder went with the failure


def test_a_timeout_must_be_positive(tmp_path: Path) -> None:
    repo, snapshot = backed_up(tmp_path, f"{UNKNOWN_UUID}/root")
    assert_one_line_error(run("verify-boot", "--repo", repo, "--timeout", "0", snapshot, check=False), 2,
                          "--timeout")


TEST_VM = """<domain type='test'><name>t1</name><memory>65536</memory><os><type>hvm</type></os><devices>
  <disk type='file' device='disk'><source file='/nonexistent.img'/><target dev='vda' bus='virtio'/>
  <serial>root</serial></disk>
  <interface type='network'><source network='default'/></interface></devices></domain>"""


def nbdkits_serving(work: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if words[0].endswith(b"nbdkit") and str(work).encode() in b" ".join(words):
            pids.append(int(cmdline.parent.name))
    return pids


def test_a_guest_that_never_answers_fails_at_the_timeout_and_nothing_is_left(tmp_path: Path) -> None:
    """libvirt's test driver "runs" the sandbox without booting anything (no VM, no lock needed):
    the real export, overlay, sandbox domain, wait, record and cleanup, with a silent guest."""
    repo, snapshot = backed_up(tmp_path, f"{UNKNOWN_UUID}/root")
    (tmp_path / "vm.xml").write_text(TEST_VM)
    work = tmp_path / "work"
    proc = run("verify-boot", "--repo", repo, "--domain-xml", tmp_path / "vm.xml", "--libvirt", "test:///default",
               "--work-dir", work, "--timeout", "2", "--json", snapshot, check=False)
    assert proc.returncode == 4, proc.stderr
    record = json.loads(proc.stdout)
    assert record["result"] == "failed" and record["reason"].startswith("no answer from the shim within 2 s")
    assert record["console"] == {"bytes": 0, "kept": 0}
    (listed,) = run_json("list", "--repo", repo)
    assert listed["verification"]["reason"] == record["reason"]
    assert list(work.iterdir()) == [] and nbdkits_serving(work) == []


def test_a_sandbox_libvirt_refuses_records_nothing(tmp_path: Path) -> None:
    repo, snapshot = backed_up(tmp_path, f"{UNKNOWN_UUID}/root")
    (tmp_path / "vm.xml").write_text(TEST_VM.replace("<memory>65536</memory>", "<memory>0</memory>"))
    work = tmp_path / "work"
    proc = run("verify-boot", "--repo", repo, "--domain-xml", tmp_path / "vm.xml", "--libvirt", "test:///default",
               "--work-dir", work, snapshot, check=False)
    assert_one_line_error(proc, 3, "libvirt refused the sandbox domain")
    (listed,) = run_json("list", "--repo", repo)
    assert listed["verification"] is None
    assert list(work.iterdir()) == [] and nbdkits_serving(work) == []


# One domain, by UUID, as it was backed up (memory 64 MiB, its disk's serial "root") and as libvirt
# holds it now (memory 128 MiB, and the disk's serial since renamed): only the definition as it was
# backed up has the snapshot's disk, so the sandbox can be made from it alone.
WEB_UUID = "00000000-0000-4000-8000-0000000000aa"
WEB = """<domain type='test'><name>web</name><uuid>{uuid}</uuid><memory>{memory}</memory>
  <os><type>hvm</type></os><devices>
  <disk type='file' device='disk'><source file='/nonexistent.img'/><target dev='vda' bus='virtio'/>
  <serial>{serial}</serial></disk></devices></domain>"""
CURRENT = f"[booted with libvirt's current definition of {WEB_UUID}]"


def live_hypervisor(tmp_path: Path, serial: str) -> str:
    """A test driver URI whose hypervisor holds the domain as it is now (its own node file: each
    connection to test:///default starts afresh, so the CLI could not see a domain defined here)."""
    node = tmp_path / f"node-{serial}.xml"
    node.write_text(f"<node>{WEB.format(uuid=WEB_UUID, memory=131072, serial=serial)}</node>")
    return f"test://{node}"


def backed_up_with_definition(tmp_path: Path) -> tuple[Path, str, str]:
    """A backup as the agent makes it: the definition stored, then the disk naming it.
    (repo, disk snapshot id, definition snapshot id)"""
    image = write_image(tmp_path / "d.img", MIB, 3)
    conn = hypervisor.connect("test:///default")
    try:
        dom = conn.defineXML(WEB.format(uuid=WEB_UUID, memory=65536, serial="root"))
        repo = Repository.init(tmp_path / "r")
        ref = vmdefinition.store(repo, vmdefinition.capture(dom), ["job-1"], tmp_path / "defwork")
        snap = repo.backup(image, f"{WEB_UUID}/root", Policy.FULL, vm=ref).snapshot
    finally:
        conn.close()
    return tmp_path / "r", snap.id, ref.definition


def test_a_snapshot_boots_with_the_definition_stored_with_its_backup(tmp_path: Path) -> None:
    repo, snapshot, definition = backed_up_with_definition(tmp_path)
    uri = live_hypervisor(tmp_path, "renamed")
    work = tmp_path / "work"
    proc = run("verify-boot", "--repo", repo, "--libvirt", uri, "--work-dir", work, "--timeout", "1",
               "--json", snapshot, check=False)
    # the sandbox was made (the stored definition has disk "root"; the live one no longer has it)
    assert proc.returncode == 4, proc.stderr
    record = json.loads(proc.stdout)
    assert record["reason"].startswith("no answer from the shim within 1 s")
    stored = f"[booted with the definition stored with its backup (snapshot {definition})]"
    assert record["reason"].endswith(stored)
    assert list(work.iterdir()) == [] and nbdkits_serving(work) == []
    # --domain-xml still overrides it
    (tmp_path / "given.xml").write_text(WEB.format(uuid=WEB_UUID, memory=65536, serial="other"))
    proc = run("verify-boot", "--repo", repo, "--libvirt", uri, "--work-dir", work, "--domain-xml",
               tmp_path / "given.xml", snapshot, check=False)
    assert proc.returncode == 2 and "definition has no disk with serial 'root'" in proc.stderr, proc.stderr
    # a stored definition pruned by another tool: libvirt's current one, as for a snapshot without one
    (repo / "snapshots" / definition).unlink()
    proc = run("verify-boot", "--repo", repo, "--libvirt", live_hypervisor(tmp_path, "root"), "--work-dir",
               work, "--timeout", "1", "--json", snapshot, check=False)
    assert proc.returncode == 4, proc.stderr
    assert json.loads(proc.stdout)["reason"].endswith(CURRENT)


def test_a_snapshot_whose_backup_stored_no_definition_boots_with_libvirts_current_one(tmp_path: Path) -> None:
    repo, snapshot = backed_up(tmp_path, f"{WEB_UUID}/root")
    work = tmp_path / "work"
    proc = run("verify-boot", "--repo", repo, "--libvirt", live_hypervisor(tmp_path, "root"), "--work-dir",
               work, "--timeout", "1", "--json", snapshot, check=False)
    assert proc.returncode == 4, proc.stderr
    assert json.loads(proc.stdout)["reason"].endswith(CURRENT)
    # and the current one is what it is: renamed, the snapshot's disk is no longer in it
    proc = run("verify-boot", "--repo", repo, "--libvirt", live_hypervisor(tmp_path, "renamed"), "--work-dir",
               work, snapshot, check=False)
    assert proc.returncode == 2 and "definition has no disk with serial 'root'" in proc.stderr, proc.stderr
