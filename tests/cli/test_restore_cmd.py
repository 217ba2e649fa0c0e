from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, sha256_file, write_image


def test_restore_latest_is_bit_identical(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 4 * MIB, 3)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    out = run_json("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.img")
    assert out["size"] == 4 * MIB
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)


def test_restore_mistakes_are_one_line(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    assert_one_line_error(run("restore", "--repo", tmp_path / "r", "nope@latest", tmp_path / "o",
                              check=False),
                          2, "no snapshot")
    image = write_image(tmp_path / "d.img", MIB, 3)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    assert_one_line_error(run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", image, check=False),
                          3, "--overwrite")
