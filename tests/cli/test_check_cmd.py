from __future__ import annotations

from pathlib import Path

from cli_helpers import run
from conftest import MIB, write_image


def test_check_passes_then_reports_a_lost_index(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", write_image(tmp_path / "d.img", 2 * MIB, 3))
    assert "ok" in run("check", "--repo", tmp_path / "r").stdout
    for index in (tmp_path / "r" / "index").iterdir():
        index.unlink()
    proc = run("check", "--repo", tmp_path / "r", check=False)
    assert proc.returncode == 4 and "MISSING chunk" in proc.stdout
