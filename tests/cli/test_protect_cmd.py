from __future__ import annotations

from pathlib import Path

from cli_helpers import run, run_json
from conftest import MIB, write_image


def test_prune_keeps_a_protected_snapshot_until_it_is_unprotected(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda",
                    write_image(tmp_path / f"d{i}.img", MIB, i))["snapshot"] for i in range(3)]
    assert "protected" in run("protect", "--repo", tmp_path / "r", ids[0][:8]).stdout
    table = run("list", "--repo", tmp_path / "r").stdout.splitlines()
    assert "PROT" in table[0] and [line.split()[-4] for line in table[1:]] == ["yes", "-", "-"]

    out = run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")
    assert out["kept"] == [ids[0], ids[2]] and out["removed"] == [ids[1]]
    run("restore", "--repo", tmp_path / "r", ids[0], tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == (tmp_path / "d0.img").read_bytes()

    run("unprotect", "--repo", tmp_path / "r", ids[0])
    assert run_json("list", "--repo", tmp_path / "r")[0]["protected"] is False
    assert run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")["removed"] == [ids[0]]


def test_a_damaged_protection_record_protects_its_snapshot(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda",
                    write_image(tmp_path / f"d{i}.img", MIB, i))["snapshot"] for i in range(2)]
    run("protect", "--repo", tmp_path / "r", ids[0])
    (tmp_path / "r" / "annotations" / ids[0]).write_text('{"snapshot": "')  # torn by a failing disk

    assert run("forget", "--repo", tmp_path / "r", ids[0], check=False).returncode != 0
    assert run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")["removed"] == []
    assert {s["id"] for s in run_json("list", "--repo", tmp_path / "r")} == set(ids)
