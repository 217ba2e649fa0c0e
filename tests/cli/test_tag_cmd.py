from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image


def test_labels_given_at_backup_then_changed_by_tag(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 1)
    sid = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", "--label", "before-upgrade",
                   "--label", "keep:legal", image)["snapshot"]
    doc = json.loads((tmp_path / "r" / "snapshots" / sid).read_text())
    assert doc["labels"] == ["before-upgrade", "keep:legal"], "the labels are not committed with the snapshot"
    assert not (tmp_path / "r" / "annotations").exists()

    shown = run_json("tag", "--repo", tmp_path / "r", "--add", "x.1", "--remove", "keep:legal",
                     "--note", "kernel 6.1 before the upgrade", sid)
    assert shown == [{"snapshot": sid, "labels": ["before-upgrade", "x.1"],
                      "note": "kernel 6.1 before the upgrade", "protected": False}]
    (row,) = run_json("list", "--repo", tmp_path / "r")
    assert row["labels"] == ["before-upgrade", "x.1"] and row["note"] == "kernel 6.1 before the upgrade"
    assert json.loads((tmp_path / "r" / "snapshots" / sid).read_text()) == doc, "the document was rewritten"
    assert "labels before-upgrade, x.1; note: kernel 6.1" in run("tag", "--repo", tmp_path / "r", sid).stdout
    run("tag", "--repo", tmp_path / "r", "--remove", "before-upgrade", "--remove", "x.1", "--note", "", sid)
    assert run_json("list", "--repo", tmp_path / "r")[0]["labels"] == []


def test_bad_labels_and_notes_change_nothing(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 1)
    assert_one_line_error(run("backup", "--repo", tmp_path / "r", "--name", "a/b", "--label", "_x", image,
                              check=False), 2, "label '_x'")
    assert run_json("list", "--repo", tmp_path / "r") == []
    sid = run_json("backup", "--repo", tmp_path / "r", "--name", "a/b", image)["snapshot"]
    for bad in (["--add", "a b"], ["--add", "x" * 65], ["--note", "two\nlines"], ["--note", "n" * 1025],
                [arg for i in range(33) for arg in ("--add", f"l{i}")]):
        assert_one_line_error(run("tag", "--repo", tmp_path / "r", *bad, sid, check=False), 2)
    assert not (tmp_path / "r" / "annotations").exists()
