from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, mutate, wait_until_settled, write_image


def test_backup_json_reports_the_numbers_scripts_need(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 4 * MIB, 1)
    out = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    assert {"snapshot", "bytes_read", "bytes_new", "bytes_stored", "seconds"} <= set(out)
    assert out["policy"] == "full" and out["bytes_read"] > 0


def test_backup_with_a_change_file_reads_only_the_changes(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 8 * MIB, 1)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    changes = mutate(image, 2, 3)
    listing = tmp_path / "changes.txt"
    listing.write_text("# offset length\n" + "".join(f"{o} {n}\n" for o, n in changes))
    out = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", "--policy", "incremental",
                   "--changes", listing, image)
    assert out["change_detection"] == "change-list"
    assert out["bytes_read"] <= 3 * (64 * 1024 + 2 * 32 * 1024)


def test_an_unchanged_image_file_is_not_read_and_the_output_says_why(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 8 * MIB, 1)
    wait_until_settled([image])  # written long enough before the base for its record to vouch for it
    base = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    out = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", "--policy", "incremental", image)
    assert out["bytes_read"] == 0 and out["unchanged_since"] == base["snapshot"]
    assert any(f"unchanged since snapshot {base['snapshot']}" in n for n in out["notes"])
    text = run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", "--policy", "incremental", image)
    assert "note: source unchanged since snapshot" in text.stdout and "read 0 B" in text.stdout


def test_backup_mistakes_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("backup", "--repo", tmp_path, "--name", "a", tmp_path, check=False), 2,
                          "not a hyperback repository", "hyperback init")
    run("init", tmp_path / "r")
    assert_one_line_error(run("backup", "--repo", tmp_path / "r", "--name", "a", tmp_path / "missing",
                              check=False), 3, "No such file")
    bad = tmp_path / "bad.txt"
    bad.write_text("12 x\n")
    image = write_image(tmp_path / "d.img", MIB, 1)
    assert_one_line_error(run("backup", "--repo", tmp_path / "r", "--name", "a", "--changes", bad, image,
                              check=False), 2, "bad.txt:1")
