"""hyperback verify-boot's user mistakes: one line, exit 2, nothing booted (the boots themselves are
tests/test_verify_boot_vm.py)."""
from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image

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
