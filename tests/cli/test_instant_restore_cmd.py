"""hyperback instant-restore: its mistakes (the recovery itself is tests/test_instant_vm.py's)."""
from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run
from conftest import MIB, write_image

XML = """<domain type='qemu'><name>orig</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"""
DISK = "<disk type='file' device='disk'><source file='/gone.img'/><target dev='vda' bus='virtio'/></disk>"


def test_instant_restore_mistakes_are_one_line(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", write_image(tmp_path / "d.img", MIB, 3))
    xml = tmp_path / "dom.xml"
    xml.write_text(XML.format(disks=DISK))
    base = ("instant-restore", "--repo", tmp_path / "r", "--as", "copy", "--xml", xml)
    assert_one_line_error(run(*base, "--to", tmp_path / "t.img", "nope@latest", check=False), 2,
                          "no snapshot")
    assert_one_line_error(run(*base, "--to", tmp_path / "d.img", "vm1/vda@latest", check=False), 2, "exists")
    assert_one_line_error(run(*base, "--to", tmp_path / "t.img", "--bandwidth", "-1", "vm1/vda@latest",
                              check=False), 2, "--bandwidth")
    assert_one_line_error(run(*base, "--to", tmp_path / "t.img", "--disk", "vdz", "vm1/vda@latest",
                              check=False), 2, "no disk 'vdz'")
    xml.write_text(XML.format(disks=""))
    assert_one_line_error(run(*base, "--to", tmp_path / "t.img", "vm1/vda@latest", check=False), 2, "no disk")
    xml.write_text("<domain")
    assert_one_line_error(run(*base, "--to", tmp_path / "t.img", "vm1/vda@latest", check=False), 2,
                          "not a domain definition")
    assert not (tmp_path / "t.img").exists()
