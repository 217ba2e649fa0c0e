from __future__ import annotations

from pathlib import Path

from cli_helpers import run, run_json
from conftest import MIB, write_image


def test_list_shows_snapshots_oldest_first(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 3)
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", n, image)["snapshot"]
           for n in ("a/x", "b/y")]
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == ids
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r", "--name", "b/y")] == ids[1:]
    table = run("list", "--repo", tmp_path / "r").stdout
    assert ids[0] in table and "a/x" in table
