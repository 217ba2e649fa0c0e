from __future__ import annotations

from pathlib import Path

from cli_helpers import assert_one_line_error, run


def test_init_creates_a_repository_once(tmp_path: Path) -> None:
    assert "created repository" in run("init", tmp_path / "r").stdout
    assert (tmp_path / "r" / "config").exists()
    assert_one_line_error(run("init", tmp_path / "r", check=False), 2, "already")


def test_init_rejects_a_bad_chunk_size(tmp_path: Path) -> None:
    assert_one_line_error(run("init", tmp_path / "r", "--chunk-size", "1000", check=False), 2, "power of two")
