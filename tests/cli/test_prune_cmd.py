from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image


def test_prune_keeps_the_last_and_frees_the_rest(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda",
                    write_image(tmp_path / f"d{i}.img", 2 * MIB, i))["snapshot"] for i in range(3)]
    dry = run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1", "--dry-run")
    assert dry["removed"] == ids[:2] and len(run_json("list", "--repo", tmp_path / "r")) == 3
    out = run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")
    assert out["kept"] == ids[2:] and out["gc"]["packs_deleted"] >= 1
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == ids[2:]
    run("restore", "--repo", tmp_path / "r", ids[2], tmp_path / "out.img")


def test_prune_without_a_keep_rule_is_refused(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    assert_one_line_error(run("prune", "--repo", tmp_path / "r", check=False), 2, "--keep-last")
