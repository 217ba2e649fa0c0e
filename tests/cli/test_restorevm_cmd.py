"""hyperback restore-vm as a user runs it: help that answers, mistakes in one line, and a VM
restored as a new domain into libvirt's test driver."""
from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, sha256_file, write_image

from host_agent import hypervisor
from host_agent.agent import vmdefinition
from host_agent.model import Policy
from host_agent.storage.repository import Repository

DOMAIN = """<domain type='test'><name>web</name><memory>65536</memory><os><type>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/><serial>root</serial></disk></devices></domain>"""


def backed_up(tmp_path: Path) -> tuple[Path, str, Path]:
    """A repository holding one run of a domain of the test driver: (repo, job id, its disk)."""
    disk = write_image(tmp_path / "web.img", 2 * MIB, 8)
    conn = hypervisor.connect("test:///default")
    try:
        dom = conn.defineXML(DOMAIN.format(disk=disk))
        repo = Repository.init(tmp_path / "repo")
        ref = vmdefinition.store(repo, vmdefinition.capture(dom), ["job-7"], tmp_path / "work")
        repo.backup(disk, f"{dom.UUIDString()}/root", Policy.FULL, vm=ref)
    finally:
        conn.close()
    return tmp_path / "repo", "job-7", disk


def test_help_says_what_each_mode_does() -> None:
    out = run("restore-vm", "--help").stdout
    for words in ("--as NAME", "--in-place", "--yes-i-want-to-replace-the-disks", "SNAPSHOT-OR-JOB",
                  "--stop"):
        assert words in out


def test_a_run_is_restored_as_a_new_domain_by_its_job_id(tmp_path: Path) -> None:
    repo, job, disk = backed_up(tmp_path)
    # the test driver starts empty for each connection: the new name is free there, and defining works
    out = run_json("restore-vm", "--repo", repo, "--connect", "test:///default", "--as", "web-copy",
                   "--to", tmp_path / "out", job)
    assert out["name"] == "web-copy" and out["disks"][0]["dev"] == "vda"
    assert sha256_file(tmp_path / "out" / "web-copy-vda.img") == sha256_file(disk)


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    repo, job, _disk = backed_up(tmp_path)
    base = ("restore-vm", "--repo", repo, "--connect", "test:///default")
    assert_one_line_error(run(*base, "--in-place", job, check=False), 2, "--yes-i-want-to-replace-the-disks")
    assert_one_line_error(run(*base, "--as", "x", "--stop", job, check=False), 2, "--in-place")
    assert_one_line_error(run(*base, "--in-place", "--yes-i-want-to-replace-the-disks", "--to", tmp_path, job,
                              check=False), 2, "--as")
    assert_one_line_error(run(*base, "--as", "x", "nope-nope", check=False), 2, "no snapshot or backup job")
    # the test driver's own domain is called "test"
    assert_one_line_error(run(*base, "--as", "test", "--to", tmp_path / "o", job, check=False), 2, "exists")
    # in place needs the domain the run came from: a fresh test driver does not have it
    assert_one_line_error(run(*base, "--in-place", "--yes-i-want-to-replace-the-disks", job, check=False), 2,
                          "--as NAME")
    assert_one_line_error(run("restore-vm", "--repo", repo, job, check=False), 2, "--as")


def test_instant_mistakes_are_one_line(tmp_path: Path) -> None:
    """--instant's arguments and refusals, said before anything starts (its real run:
    tests/test_restore_vm.py on the test driver, tests/test_instant_vm.py with QEMU)."""
    repo, job, _disk = backed_up(tmp_path)
    base = ("restore-vm", "--repo", repo, "--connect", "test:///default")
    assert_one_line_error(run(*base, "--in-place", "--yes-i-want-to-replace-the-disks", "--instant", job,
                              check=False), 2, "--instant goes with --as")
    assert_one_line_error(run(*base, "--as", "x", "--bandwidth", "1000", job, check=False), 2,
                          "go with --instant")
    assert_one_line_error(run(*base, "--as", "x", "--instant", "--bandwidth", "-1", job, check=False), 2,
                          "bytes per second")
    assert_one_line_error(run(*base, "--as", "test", "--instant", "--to", tmp_path / "o", "--run-dir",
                              tmp_path / "run", job, check=False), 2, "exists")
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()
    assert "--instant" in run("restore-vm", "--help").stdout
