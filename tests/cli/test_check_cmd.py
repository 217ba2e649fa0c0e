from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run
from conftest import MIB, write_image


def test_check_passes_then_reports_a_lost_index(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", write_image(tmp_path / "d.img", 2 * MIB, 3))
    assert "ok" in run("check", "--repo", tmp_path / "r").stdout
    for index in (tmp_path / "r" / "index").iterdir():
        index.unlink()
    proc = run("check", "--repo", tmp_path / "r", check=False)
    assert proc.returncode == 4 and "MISSING chunk" in proc.stdout


def test_check_repair_rebuilds_a_lost_index_only_when_told(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", write_image(tmp_path / "d.img", 2 * MIB, 3))
    (index,) = (tmp_path / "r" / "index").iterdir()
    index.unlink()
    assert "hyperback check --repo" in run("check", "--repo", tmp_path / "r", check=False).stdout
    assert "would rebuild index" in run("check", "--repo", tmp_path / "r", "--repair").stdout
    assert not index.exists()
    assert "rebuilt index" in run("check", "--repo", tmp_path / "r", "--repair", "--yes").stdout
    assert "ok" in run("check", "--repo", tmp_path / "r").stdout
    assert_one_line_error(run("check", "--repo", tmp_path / "r", "--yes", check=False), 2, "--repair")
